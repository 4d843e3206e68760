"""Gene resolution: IDs normalised, symbols mapped, duplicates share a token, gene sets."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cellrank_fm.errors import UserError
from cellrank_fm.genes import (
    build_plan,
    counts_share,
    load_gene_set,
    load_mapping,
    normalise_id,
    resolve_gene_set,
)

VOCAB = {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2, "ENSG00000000005": 3, "ENSG00000000419": 4}
MEDIANS = {"ENSG00000000003": 2.0, "ENSG00000000005": 3.0, "ENSG00000000419": 0.5, "ENSG00000999999": 1.0}


def test_normalise_id():
    assert normalise_id("ensg00000141510.17") == "ENSG00000141510"
    assert normalise_id(" ENSG00000141510 ") == "ENSG00000141510"
    assert normalise_id("ENSMUSG00000000001.4") == "ENSMUSG00000000001"
    assert normalise_id("ENSG00000228572.7_PAR_Y") == "ENSG00000228572_PAR_Y"
    assert normalise_id("TP53") is None


def test_mapping_tables_and_plan(tmp_path):
    (tmp_path / "names.pkl").write_bytes(pickle.dumps({"TSPAN6": "ENSG00000000003", "DPM1": "ENSG00000000419"}))
    (tmp_path / "gencode.csv").write_text("ENSG00000000005.6,TNMD\nENSG00000000003.15,TSPAN6\n")
    (tmp_path / "retired.pkl").write_bytes(pickle.dumps({"ENSG00000111111": "ENSG00000000419"}))
    mapping = load_mapping([tmp_path / "names.pkl", tmp_path / "gencode.csv", tmp_path / "retired.pkl"])
    labels = ["ensg00000000003.4", "tnmd", "DPM1", "ENSG00000111111", "TSPAN6", "NOTAGENE", "ENSG00000999999"]
    plan = build_plan(labels, VOCAB, MEDIANS, mapping)
    # lower-case versioned ID, symbol (case-insensitive), retired ID; TSPAN6 lands on token 2 again.
    assert plan.col_token.tolist() == [2, 3, 4, 4, 2, -1, -1]
    assert plan.col_median.tolist()[:5] == [2.0, 3.0, 0.5, 0.5, 2.0]
    assert plan.n_recognised == 5 and plan.n_merged == 2 and plan.n_columns == 7
    assert plan.symbols["ENSG00000000005"] == "tnmd" or plan.symbols["ENSG00000000005"] == "TNMD"
    assert mapping.symbols["ENSG00000000003"] == "TSPAN6"
    # Without a mapping table, symbols are not recognised.
    bare = build_plan(labels, VOCAB, MEDIANS, None)
    assert bare.col_token.tolist() == [2, -1, -1, -1, -1, -1, -1]


def test_gene_set_keeps_full_vocabulary_ids_and_counts_share(tmp_path):
    (tmp_path / "set.txt").write_text("ENSG00000000419\nTNMD\n")
    mapping_file = tmp_path / "gencode.tsv"
    mapping_file.write_text("gene_id\tgene_name\nENSG00000000005\tTNMD\n")
    mapping = load_mapping([mapping_file])
    ids, missing = resolve_gene_set(load_gene_set(tmp_path / "set.txt"), mapping, VOCAB)
    assert ids == {"ENSG00000000419", "ENSG00000000005"} and missing == 0
    labels = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "OTHER"]
    plan = build_plan(labels, VOCAB, MEDIANS, mapping, gene_set=ids)
    assert plan.col_token.tolist() == [-1, 3, 4, -1]
    assert plan.n_recognised == 3 and plan.n_used == 2
    share = counts_share(plan, np.array([0, 1, 2, 3]), np.array([2.0, 1.0, 2.0, 5.0]))
    assert share == pytest.approx(0.5)  # recognised genes count even outside the set


def test_gene_set_csv_column_detection(tmp_path):
    f = tmp_path / "mito.csv"
    f.write_text("HumanGeneID,Symbol,EnsemblGeneID\n1,CYC1,ENSG00000179091\n2,SDHB,ENSG00000117118|ENSG00000000003\n")
    assert load_gene_set(f) == ["ENSG00000179091", "ENSG00000117118", "ENSG00000000003"]
    assert load_gene_set(f, "Symbol") == ["CYC1", "SDHB"]
    with pytest.raises(UserError, match="no column 'Gene'"):
        load_gene_set(f, "Gene")


def test_real_mapping_tables(shared_data):
    gf = shared_data / "geneformer"
    mapping = load_mapping([gf / "gene_name_id_dict_gc104M.pkl", shared_data / "genes" / "GENCODEv44_Gene_id2name.csv"])
    assert mapping.lookup("tp53") == "ENSG00000141510"
    assert mapping.lookup("ENSG00000141510.19") == "ENSG00000141510"
    mito = load_gene_set(shared_data / "genes" / "Human.MitoCarta3.0.csv")
    ids, missing = resolve_gene_set(mito, mapping, {})
    assert len(ids) > 1100 and all(i.startswith("ENSG") for i in ids)
