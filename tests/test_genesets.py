"""Gene sets in: GMT, two-column tables and the MitoCarta3.0 hierarchy, resolved like cell genes."""

from __future__ import annotations

import gzip

import pytest

from cellrank_fm.errors import UserError
from cellrank_fm.genes import GeneMapping
from cellrank_fm.genesets import load_gene_sets, read_gene_sets

VOCAB = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i + 2 for i in range(1, 21)}}
SYMBOLS = {f"ENSG{i:011d}": f"GENE{i}" for i in range(1, 21)}


def gid(i: int) -> str:
    return f"ENSG{i:011d}"


def test_gmt_two_column_and_gzip_read_the_same_sets(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(f"UP\thttp://x\t{gid(1)}\t{gid(2)}.5\tgene3\tGENE4\tNOTAGENE\n"
                   f"# a comment\nDOWN\tna\t{gid(5)}\t{gid(6)}\t{gid(7)}\t{gid(8)}\t{gid(9)}\t{gid(10)}\n")
    csv = tmp_path / "sets.csv"
    rows = ["pathway,gene"] + [f"UP,{g}" for g in [gid(1), gid(2) + ".5", "gene3", "GENE4", "NOTAGENE"]] + \
        [f"DOWN,{gid(i)}" for i in range(5, 11)]
    csv.write_text("\n".join(rows) + "\n")
    tsv = tmp_path / "sets.tsv.gz"
    with gzip.open(tsv, "wt") as fh:
        fh.write("\n".join(r.replace(",", "\t") for r in rows[1:]) + "\n")
    for path in (gmt, csv, tsv):
        gs = load_gene_sets([path], VOCAB, symbols=[SYMBOLS], min_size=4)
        assert gs.names == ["UP", "DOWN"], path
        # Versioned IDs lose their suffix; symbols resolve case-insensitively through the model's symbols.
        assert gs["UP"].genes == [gid(1), gid(2), gid(3), gid(4)] and gs["UP"].n_genes == 5
        assert gs["DOWN"].n_in_vocab == 6
    tokens = gs.token_sets(VOCAB)
    assert tokens[0].tolist() == [3, 4, 5, 6]
    member = gs.membership(VOCAB).toarray()
    assert member.shape == (23, 2) and member[:, 0].sum() == 4 and member[7, 1] == 1


def test_min_set_size_drops_with_a_note_and_names_select(tmp_path, capsys):
    from cellrank_fm.genesets import report

    gmt = tmp_path / "s.gmt"
    gmt.write_text(f"BIG\t\t{gid(1)}\t{gid(2)}\t{gid(3)}\t{gid(4)}\t{gid(5)}\nSMALL\t\t{gid(6)}\t{gid(7)}\n")
    gs = load_gene_sets([gmt], VOCAB)
    assert gs.names == ["BIG"] and [d.name for d in gs.dropped] == ["SMALL"]
    report(gs)
    err = capsys.readouterr().err
    assert "1 set(s) with fewer than 5 genes" in err and "SMALL (2)" in err
    cov = gs.coverage()
    assert cov.set_index("pathway").loc["SMALL", "kept"] == False  # noqa: E712
    with pytest.raises(UserError, match="'SMALL' has 2 gene"):
        load_gene_sets([gmt], VOCAB, names=["SMALL"])
    with pytest.raises(UserError, match="'NOPE' is not in"):
        load_gene_sets([gmt], VOCAB, names=["NOPE"])
    assert load_gene_sets([gmt], VOCAB, names=["BIG"]).names == ["BIG"]


def test_symbols_resolve_through_the_gene_map_and_the_model_gene_set(tmp_path):
    mapping = GeneMapping()
    mapping.add("ALIAS1", gid(1), symbol_ok=True)
    mapping.add("ALIAS2", gid(2), symbol_ok=True)
    gmt = tmp_path / "s.gmt"
    gmt.write_text(f"S\t\tALIAS1\talias2\t{gid(3)}\n")
    assert load_gene_sets([gmt], VOCAB, mapping=mapping, min_size=3)["S"].genes == [gid(1), gid(2), gid(3)]
    # A model trained on a gene set reads only those genes.
    gs = load_gene_sets([gmt], VOCAB, mapping=mapping, gene_set=[gid(1), gid(3)], min_size=1)
    assert gs["S"].genes == [gid(1), gid(3)]


def test_bad_files_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(UserError, match="not a gene set file cellrank reads"):
        read_gene_sets(bad)
    empty = tmp_path / "e.gmt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        read_gene_sets(empty)
    with pytest.raises(UserError, match="does not exist"):
        read_gene_sets(tmp_path / "missing.gmt")
    gmt = tmp_path / "s.gmt"
    gmt.write_text("S\t\tFOO\tBAR\tBAZ\n")
    with pytest.raises(UserError, match="no gene set in .* has 5 or more genes"):
        load_gene_sets([gmt], VOCAB)
    twice = tmp_path / "t.gmt"
    twice.write_text(f"S\t\t{gid(1)}\n")
    with pytest.raises(UserError, match="listed in both"):
        load_gene_sets([gmt, twice], VOCAB)
    with pytest.raises(UserError, match="--gene-set-level must be 1, 2 or 3"):
        read_gene_sets(gmt, level=4)


def test_mitocarta_levels(shared_data):
    path = shared_data / "genes" / "Human.MitoCarta3.0.csv"
    level1 = read_gene_sets(path, level=1)
    assert sorted(s.name for s in level1) == sorted([
        "OXPHOS", "Metabolism", "Protein import, sorting and homeostasis", "Mitochondrial central dogma",
        "Small molecule transport", "Signaling", "Mitochondrial dynamics and surveillance"])
    by_name = {s.name: s for s in level1}
    symbols = {g[-1] for g in by_name["OXPHOS"].genes}
    assert {"CYC1", "NDUFA1", "COX4I1", "ATP5F1A"} <= symbols and "CS" not in symbols
    leaves = read_gene_sets(path, level=3)
    assert len(leaves) == 136 and len(read_gene_sets(path, level=2)) == 42
    leaf = {s.name: s for s in leaves}
    assert leaf["CIII subunits"].description == "OXPHOS > Complex III > CIII subunits"
    assert "TCA cycle" in leaf and {g[-1] for g in leaf["TCA cycle"].genes} >= {"CS", "ACO2", "IDH3A", "SDHA"}
    # A gene listed in several pathways belongs to each; its Ensembl ID comes before its symbol.
    assert ("ENSG00000179091", "CYC1") in leaf["CIII subunits"].genes
    assert ("ENSG00000179091", "CYC1") in leaf["Cytochromes"].genes


def test_mitocarta_resolves_against_the_geneformer_vocabulary(shared_data):
    from cellrank_fm.vocab import load_vocabulary

    vocab = load_vocabulary(shared_data / "geneformer" / "token_dictionary_gc30M.pkl")
    gs = load_gene_sets([shared_data / "genes" / "Human.MitoCarta3.0.csv"], vocab, level=3)
    sizes = {s.name: (s.n_genes, s.n_in_vocab) for s in gs.sets}
    assert sizes["CI subunits"] == (44, 44) and all(n <= listed for listed, n in sizes.values())
    assert len(gs) + len(gs.dropped) == 136 and len(gs) >= 90
