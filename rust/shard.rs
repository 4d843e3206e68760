//! Token shard writer: Parquet parts written by a background thread.
//!
//! The caller validates and copies each chunk (tokens and offsets, plus Arrow arrays of the
//! other columns), then hands it over a bounded channel, so the next chunk can be tokenized
//! while this one is encoded. `input_ids` is encoded by `token_column`; the other columns by
//! the Arrow writer, with zstd. A part is written as `.part-NNNNN.parquet.tmp` and renamed to
//! `part-NNNNN.parquet` only once complete (after an fsync), so a crash never leaves a file
//! that looks whole. An error on the thread is reported by the next call (or `finish`).

use crate::token_column;
use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_writer::{compute_leaves, ArrowRowGroupWriterFactory};
use parquet::arrow::{add_encoded_arrow_schema_to_metadata, ArrowSchemaConverter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesPtr};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::SchemaDescPtr;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Chunks waiting for the writer thread; small, since each holds a whole chunk's tokens.
const QUEUE_DEPTH: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TokenType {
    U16,
    U32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetaKind {
    Str,
    I64,
    F64,
    Bool,
}

impl MetaKind {
    pub fn parse(kind: &str) -> Result<Self, String> {
        match kind {
            "str" => Ok(MetaKind::Str),
            "i64" => Ok(MetaKind::I64),
            "f64" => Ok(MetaKind::F64),
            "bool" => Ok(MetaKind::Bool),
            other => Err(format!("unknown metadata kind {other:?}; use str, i64, f64 or bool")),
        }
    }
}

/// One metadata column of a chunk (`None` strings become nulls).
#[derive(Clone, Debug)]
pub enum MetaColumn {
    Str(Vec<Option<String>>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
}

impl MetaColumn {
    fn len(&self) -> usize {
        match self {
            MetaColumn::Str(v) => v.len(),
            MetaColumn::I64(v) => v.len(),
            MetaColumn::F64(v) => v.len(),
            MetaColumn::Bool(v) => v.len(),
        }
    }
    fn kind(&self) -> MetaKind {
        match self {
            MetaColumn::Str(_) => MetaKind::Str,
            MetaColumn::I64(_) => MetaKind::I64,
            MetaColumn::F64(_) => MetaKind::F64,
            MetaColumn::Bool(_) => MetaKind::Bool,
        }
    }
    fn into_array(self) -> ArrayRef {
        match self {
            MetaColumn::Str(v) => Arc::new(StringArray::from(v)),
            MetaColumn::I64(v) => Arc::new(Int64Array::from(v)),
            MetaColumn::F64(v) => Arc::new(Float64Array::from(v)),
            MetaColumn::Bool(v) => Arc::new(BooleanArray::from(v)),
        }
    }
}

/// Token arrays as borrowed from the caller (`tokenize`'s output, or any subset of rows).
pub enum TokenSlice<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

/// `Invalid`: the caller's arguments (nothing was queued). `Io`: the writer thread failed
/// (disk full, permissions, ...); the writer is unusable afterwards.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardError {
    Invalid(String),
    Io(IoFailure),
}

/// A failed file operation: what was being done, and the OS error number when there is one,
/// so callers can say why (a full disk reads differently from a read-only one).
#[derive(Debug, Clone, PartialEq)]
pub struct IoFailure {
    pub message: String,
    pub errno: Option<i32>,
}

impl IoFailure {
    /// `message` plus the OS error found anywhere in `err`'s chain of sources.
    fn new(message: String, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut cur = Some(err);
        let mut errno = None;
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                errno = io.raw_os_error();
                break;
            }
            cur = e.source();
        }
        IoFailure { message, errno }
    }

    fn plain(message: &str) -> Self {
        IoFailure { message: message.to_string(), errno: None }
    }
}

impl std::fmt::Display for ShardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardError::Invalid(m) => f.write_str(m),
            ShardError::Io(e) => f.write_str(&e.message),
        }
    }
}

impl From<String> for ShardError {
    fn from(m: String) -> Self {
        ShardError::Invalid(m)
    }
}

impl From<&str> for ShardError {
    fn from(m: &str) -> Self {
        ShardError::Invalid(m.to_string())
    }
}

impl ShardError {
    pub fn contains(&self, pat: &str) -> bool {
        self.to_string().contains(pat)
    }
}

/// A chunk's tokens, owned by the writer thread.
enum Tokens {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

/// One row group: tokens with offsets from 0, and the other columns in schema order.
struct Batch {
    tokens: Tokens,
    offsets: Vec<i32>,
    columns: Vec<ArrayRef>,
}

enum Msg {
    Begin(u32),
    Batch(Batch),
    End,
}

pub fn part_name(index: u32) -> String {
    format!("part-{index:05}.parquet")
}

fn temp_name(index: u32) -> String {
    format!(".part-{index:05}.parquet.tmp")
}

pub struct ShardWriter {
    token_type: TokenType,
    meta_schema: Vec<(String, MetaKind)>,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<BTreeMap<u32, u64>, IoFailure>>>,
    error: Arc<Mutex<Option<IoFailure>>>,
    open_part: Option<u32>,
    begun: std::collections::BTreeSet<u32>,
}

impl ShardWriter {
    /// Creates `out_dir` if needed and starts the writer thread.
    pub fn new(
        out_dir: &Path,
        token_type: TokenType,
        meta_schema: Vec<(String, MetaKind)>,
        zstd_level: i32,
    ) -> Result<Self, ShardError> {
        let level = ZstdLevel::try_new(zstd_level).map_err(|e| format!("invalid zstd level {zstd_level}: {e}"))?;
        let mut fields = vec![
            Field::new(
                "input_ids",
                DataType::new_list(
                    if token_type == TokenType::U16 { DataType::UInt16 } else { DataType::UInt32 },
                    false,
                ),
                false,
            ),
            Field::new("length", DataType::UInt32, false),
            Field::new("cell_id", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, false),
        ];
        for (name, kind) in &meta_schema {
            if fields.iter().any(|f| f.name() == name) {
                return Err(format!("metadata column {name:?} clashes with another column of the shard").into());
            }
            let (dt, nullable) = match kind {
                MetaKind::Str => (DataType::Utf8, true),
                MetaKind::I64 => (DataType::Int64, false),
                MetaKind::F64 => (DataType::Float64, false),
                MetaKind::Bool => (DataType::Boolean, false),
            };
            fields.push(Field::new(name, dt, nullable));
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        fs::create_dir_all(out_dir)
            .map_err(|e| ShardError::Io(IoFailure::new(format!("cannot create {}: {e}", out_dir.display()), &e)))?;
        let mut props = WriterProperties::builder().set_compression(Compression::ZSTD(level)).build();
        add_encoded_arrow_schema_to_metadata(&schema, &mut props);
        let layout = Layout {
            parquet: Arc::new(
                ArrowSchemaConverter::new()
                    .convert(&schema)
                    .map_err(|e| format!("cannot map the shard schema to Parquet: {e}"))?,
            ),
            arrow: schema.clone(),
            props: Arc::new(props),
        };
        let (tx, rx) = sync_channel(QUEUE_DEPTH);
        let error = Arc::new(Mutex::new(None));
        let thread = {
            let (dir, error) = (out_dir.to_path_buf(), error.clone());
            std::thread::Builder::new()
                .name("cellrank-shard-writer".into())
                .spawn(move || {
                    let result = writer_loop(&dir, &layout, rx);
                    if let Err(e) = &result {
                        *error.lock().unwrap() = Some(e.clone());
                    }
                    result
                })
                .map_err(|e| ShardError::Io(IoFailure::new(format!("cannot start the shard writer thread: {e}"), &e)))?
        };
        Ok(ShardWriter {
            token_type,
            meta_schema,
            tx: Some(tx),
            thread: Some(thread),
            error,
            open_part: None,
            begun: Default::default(),
        })
    }

    /// The first error the writer thread hit, if any.
    fn check(&self) -> Result<(), ShardError> {
        match &*self.error.lock().unwrap() {
            Some(e) => Err(ShardError::Io(e.clone())),
            None => Ok(()),
        }
    }

    fn send(&mut self, msg: Msg) -> Result<(), ShardError> {
        self.check()?;
        let tx = self.tx.as_ref().ok_or("the shard writer was already finished or aborted")?;
        if tx.send(msg).is_err() {
            // The thread stopped: it recorded why before exiting.
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            self.check()?;
            return Err(ShardError::Io(IoFailure::plain("the shard writer thread stopped unexpectedly")));
        }
        Ok(())
    }

    pub fn begin_part(&mut self, index: u32) -> Result<(), ShardError> {
        if let Some(open) = self.open_part {
            return Err(format!("part {open} is still open; end it before beginning part {index}").into());
        }
        if !self.begun.insert(index) {
            return Err(format!("part {index} was already written by this writer").into());
        }
        self.send(Msg::Begin(index))?;
        self.open_part = Some(index);
        Ok(())
    }

    /// Appends one row group to the open part. Row `r` has the tokens
    /// `tokens[offsets[r] - offsets[0] .. offsets[r + 1] - offsets[0]]`.
    pub fn write(
        &mut self,
        tokens: TokenSlice,
        offsets: &[i64],
        cell_ids: Vec<String>,
        source: &str,
        mut meta: BTreeMap<String, MetaColumn>,
    ) -> Result<(), ShardError> {
        self.check()?;
        if self.open_part.is_none() {
            return Err("no part is open; call begin_part first".into());
        }
        let batch = self.make_batch(tokens, offsets, cell_ids, source, &mut meta)?;
        if batch.offsets.len() == 1 {
            return Ok(());
        }
        self.send(Msg::Batch(batch))
    }

    fn make_batch(
        &self,
        tokens: TokenSlice,
        offsets: &[i64],
        cell_ids: Vec<String>,
        source: &str,
        meta: &mut BTreeMap<String, MetaColumn>,
    ) -> Result<Batch, String> {
        let rows = offsets.len().checked_sub(1).ok_or("offsets must have at least one entry")?;
        let n_tokens = match tokens {
            TokenSlice::U16(t) => t.len(),
            TokenSlice::U32(t) => t.len(),
        };
        let base = offsets[0];
        let mut rel = Vec::with_capacity(offsets.len());
        let mut lengths = Vec::with_capacity(rows);
        for w in offsets.windows(2) {
            if w[1] < w[0] {
                return Err("offsets must not decrease".into());
            }
            lengths.push((w[1] - w[0]) as u32);
        }
        let span = (offsets[rows] - base) as usize;
        if span > n_tokens {
            return Err(format!("offsets span {span} tokens but only {n_tokens} were given"));
        }
        if span > i32::MAX as usize {
            return Err("a single write may hold at most 2^31 tokens".into());
        }
        rel.extend(offsets.iter().map(|&o| (o - base) as i32));
        if cell_ids.len() != rows {
            return Err(format!("{} cell ids for {rows} rows", cell_ids.len()));
        }
        let tokens = match (self.token_type, tokens) {
            (TokenType::U16, TokenSlice::U16(t)) => Tokens::U16(t[..span].to_vec()),
            (TokenType::U32, TokenSlice::U32(t)) => Tokens::U32(t[..span].to_vec()),
            (TokenType::U32, TokenSlice::U16(t)) => Tokens::U32(t[..span].iter().map(|&x| x as u32).collect()),
            (TokenType::U16, TokenSlice::U32(t)) => Tokens::U16(
                t[..span]
                    .iter()
                    .map(|&x| u16::try_from(x))
                    .collect::<Result<_, _>>()
                    .map_err(|_| "a token id does not fit the shard's uint16 token type".to_string())?,
            ),
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from(lengths)),
            Arc::new(StringArray::from(cell_ids)),
            Arc::new(StringArray::from(vec![source; rows])),
        ];
        for (name, kind) in &self.meta_schema {
            let col = meta.remove(name).ok_or_else(|| format!("metadata column {name:?} is missing"))?;
            if col.kind() != *kind || col.len() != rows {
                return Err(format!(
                    "metadata column {name:?} must hold {rows} values of kind {kind:?}, got {} of kind {:?}",
                    col.len(),
                    col.kind()
                ));
            }
            columns.push(col.into_array());
        }
        if let Some(extra) = meta.keys().next() {
            return Err(format!("metadata column {extra:?} is not in the shard's schema"));
        }
        Ok(Batch { tokens, offsets: rel, columns })
    }

    /// Completes the open part: the thread closes it and renames it to its final name.
    pub fn end_part(&mut self) -> Result<(), ShardError> {
        if self.open_part.is_none() {
            return Err("no part is open".into());
        }
        self.send(Msg::End)?;
        self.open_part = None;
        Ok(())
    }

    /// Waits for the thread and returns each published part's row count. A part still open is
    /// an error (its temporary file is removed, nothing is published for it).
    pub fn finish(&mut self) -> Result<BTreeMap<u32, u64>, ShardError> {
        let open = self.open_part.take();
        self.tx = None;
        let result = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| ShardError::Io(IoFailure::plain("the shard writer thread panicked")))?
                .map_err(ShardError::Io),
            None => {
                self.check()?;
                Err("the shard writer was already finished or aborted".into())
            }
        };
        let done = result?; // the thread's own error comes first
        if let Some(index) = open {
            return Err(format!("part {index} was begun but never ended").into());
        }
        Ok(done)
    }

    /// Stops the thread and removes the open part's temporary file; published parts stay.
    pub fn abort(&mut self) {
        self.open_part = None;
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Drops a synced part's pages from the page cache: shards are written once and read later,
/// so a large run should not fill memory with them.
fn release_cache(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only advises the kernel.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// The shard schema in both forms, and the writer properties, shared by every part.
struct Layout {
    arrow: SchemaRef,
    parquet: SchemaDescPtr,
    props: WriterPropertiesPtr,
}

struct OpenPart {
    index: u32,
    temp: PathBuf,
    writer: SerializedFileWriter<File>,
    columns: ArrowRowGroupWriterFactory,
    row_groups: usize,
    rows: u64,
}

impl OpenPart {
    /// Writes one row group: `input_ids` from `token_column`, the rest with Arrow's writers.
    fn write(&mut self, layout: &Layout, batch: Batch) -> parquet::errors::Result<()> {
        let descr = layout.parquet.column(0);
        let chunk = match &batch.tokens {
            Tokens::U16(t) => token_column::encode(descr, t, &batch.offsets)?,
            Tokens::U32(t) => token_column::encode(descr, t, &batch.offsets)?,
        };
        let mut group = self.writer.next_row_group()?;
        group.append_column(&chunk.bytes, chunk.close)?;
        // One Arrow writer per leaf; the first is input_ids', written above.
        let mut writers = self.columns.create_column_writers(self.row_groups)?.into_iter().skip(1);
        for (field, array) in layout.arrow.fields().iter().skip(1).zip(&batch.columns) {
            for leaf in compute_leaves(field, array)? {
                let mut writer = writers.next().expect("one writer per leaf column");
                writer.write(&leaf)?;
                writer.close()?.append_to_row_group(&mut group)?;
            }
        }
        group.close()?;
        self.row_groups += 1;
        self.rows += batch.offsets.len() as u64 - 1;
        Ok(())
    }
}

/// Runs on the writer thread until the channel closes. Closing with a part still open (abort,
/// drop, or `finish` without `end_part`) and any error remove that part's temporary file.
fn writer_loop(dir: &Path, layout: &Layout, rx: Receiver<Msg>) -> Result<BTreeMap<u32, u64>, IoFailure> {
    let mut done = BTreeMap::new();
    let mut open: Option<OpenPart> = None;
    let result = (|| {
        for msg in rx.iter() {
            match msg {
                Msg::Begin(index) => {
                    let temp = dir.join(temp_name(index));
                    let file = File::create(&temp).map_err(|e| IoFailure::new(format!("cannot create {}: {e}", temp.display()), &e))?;
                    let writer = SerializedFileWriter::new(file, layout.parquet.root_schema_ptr(), layout.props.clone())
                        .map_err(|e| IoFailure::new(format!("cannot start {}: {e}", temp.display()), &e))?;
                    let columns = ArrowRowGroupWriterFactory::new(&writer, layout.arrow.clone());
                    open = Some(OpenPart { index, temp, writer, columns, row_groups: 0, rows: 0 });
                }
                Msg::Batch(batch) => {
                    let part = open.as_mut().expect("write checks that a part is open");
                    part.write(layout, batch).map_err(|e| IoFailure::new(format!("cannot write {}: {e}", part.temp.display()), &e))?;
                }
                Msg::End => {
                    let part = open.take().expect("end_part checks that a part is open");
                    let temp = part.temp.clone();
                    let publish = || -> Result<(), IoFailure> {
                        let file = part.writer.into_inner().map_err(|e| IoFailure::new(format!("cannot finish {}: {e}", temp.display()), &e))?;
                        file.sync_all().map_err(|e| IoFailure::new(format!("cannot sync {}: {e}", temp.display()), &e))?;
                        release_cache(&file);
                        let fin = dir.join(part_name(part.index));
                        fs::rename(&temp, &fin)
                            .map_err(|e| IoFailure::new(format!("cannot rename {} to {}: {e}", temp.display(), fin.display()), &e))
                    };
                    if let Err(e) = publish() {
                        let _ = fs::remove_file(&temp);
                        return Err(e);
                    }
                    done.insert(part.index, part.rows);
                }
            }
        }
        Ok(())
    })();
    if let Some(part) = open.take() {
        drop(part.writer);
        let _ = fs::remove_file(&part.temp);
    }
    result.map(|_| done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::{Array, RecordBatch};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cellrank-shard-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn writes_parts_that_read_back() {
        let dir = tempdir("roundtrip");
        let schema = vec![("cell_type".to_string(), MetaKind::Str), ("n".to_string(), MetaKind::I64), ("ok".to_string(), MetaKind::Bool)];
        let mut w = ShardWriter::new(&dir, TokenType::U16, schema, 3).unwrap();
        w.begin_part(7).unwrap();
        for chunk in 0..2u32 {
            let tokens: Vec<u32> = vec![9, 5, 4, 100 + chunk, 8, 8, 8];
            let offsets = [10i64, 13, 13, 17]; // not starting at 0; second row empty
            let mut meta = BTreeMap::new();
            meta.insert("cell_type".into(), MetaColumn::Str(vec![Some("T".into()), None, Some("B".into())]));
            meta.insert("n".into(), MetaColumn::I64(vec![1, 2, chunk as i64]));
            meta.insert("ok".into(), MetaColumn::Bool(vec![true, false, true]));
            let ids = (0..3).map(|i| format!("c{chunk}-{i}")).collect();
            w.write(TokenSlice::U32(&tokens), &offsets, ids, "a.h5ad", meta).unwrap();
        }
        w.end_part().unwrap();
        let rows = w.finish().unwrap();
        assert_eq!(rows, BTreeMap::from([(7, 6)]));
        assert_eq!(listing(&dir), vec!["part-00007.parquet"]);

        let file = File::open(dir.join("part-00007.parquet")).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        assert_eq!(builder.metadata().num_row_groups(), 2);
        let names: Vec<_> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["input_ids", "length", "cell_id", "source", "cell_type", "n", "ok"]);
        let batches: Vec<RecordBatch> = builder.with_batch_size(3).build().unwrap().map(|b| b.unwrap()).collect();
        let b = &batches[1];
        let ids = b.column(0).as_list::<i32>();
        let first = ids.value(0);
        assert_eq!(first.as_primitive::<arrow_array::types::UInt16Type>().values().to_vec(), vec![9, 5, 4]);
        assert_eq!(ids.value(1).len(), 0);
        assert_eq!(
            ids.value(2).as_primitive::<arrow_array::types::UInt16Type>().values().to_vec(),
            vec![101, 8, 8, 8]
        );
        assert_eq!(b.column(1).as_primitive::<arrow_array::types::UInt32Type>().values().to_vec(), vec![3, 0, 4]);
        assert_eq!(b.column(2).as_string::<i32>().value(2), "c1-2");
        assert_eq!(b.column(3).as_string::<i32>().value(0), "a.h5ad");
        assert!(b.column(4).is_null(1));
        assert_eq!(b.column(4).as_string::<i32>().value(2), "B");
        assert_eq!(b.column(5).as_primitive::<arrow_array::types::Int64Type>().values().to_vec(), vec![1, 2, 1]);
        assert!(!b.column(6).as_boolean().value(1));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn large_row_groups_span_several_pages_and_wide_tokens_survive() {
        let dir = tempdir("pages");
        let mut w = ShardWriter::new(&dir, TokenType::U32, vec![], 1).unwrap();
        w.begin_part(0).unwrap();
        // 800 rows of 0..1,500 tokens: ~600k values, so the chunk needs two data pages.
        let mut rng = 7u64;
        let mut tokens = Vec::new();
        let mut offsets = vec![0i64];
        for r in 0..800u64 {
            for _ in 0..(r * 37 % 1500) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                tokens.push((rng % 90_000) as u32);
            }
            offsets.push(tokens.len() as i64);
        }
        let ids = (0..800).map(|i| format!("c{i}")).collect();
        w.write(TokenSlice::U32(&tokens), &offsets, ids, "s", BTreeMap::new()).unwrap();
        w.end_part().unwrap();
        w.finish().unwrap();
        let file = File::open(dir.join("part-00000.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().with_batch_size(1000).build().unwrap();
        let batch = reader.map(|b| b.unwrap()).next().unwrap();
        let lists = batch.column(0).as_list::<i32>();
        assert_eq!(lists.len(), 800);
        for r in 0..800 {
            let (a, b) = (offsets[r] as usize, offsets[r + 1] as usize);
            let got = lists.value(r);
            assert_eq!(got.as_primitive::<arrow_array::types::UInt32Type>().values().to_vec(), tokens[a..b], "row {r}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unfinished_or_failed_parts_leave_no_part_file() {
        let dir = tempdir("abort");
        let mut w = ShardWriter::new(&dir, TokenType::U32, vec![], 1).unwrap();
        w.begin_part(0).unwrap();
        w.write(TokenSlice::U32(&[1, 2]), &[0, 2], vec!["a".into()], "s", BTreeMap::new()).unwrap();
        w.end_part().unwrap();
        w.begin_part(1).unwrap();
        w.write(TokenSlice::U32(&[1, 2]), &[0, 2], vec!["a".into()], "s", BTreeMap::new()).unwrap();
        w.abort();
        assert_eq!(listing(&dir), vec!["part-00000.parquet"]);
        // finish with a part still open is an error and publishes nothing for it.
        let mut w = ShardWriter::new(&dir, TokenType::U32, vec![], 1).unwrap();
        w.begin_part(2).unwrap();
        assert!(w.finish().unwrap_err().contains("part 2 was begun but never ended"));
        // Dropping a writer mid-part cleans up as well.
        let mut w = ShardWriter::new(&dir, TokenType::U32, vec![], 1).unwrap();
        w.begin_part(3).unwrap();
        drop(w);
        assert_eq!(listing(&dir), vec!["part-00000.parquet"]);
        // Bad chunks are refused before they reach the thread.
        let mut w = ShardWriter::new(&dir, TokenType::U16, vec![("x".into(), MetaKind::F64)], 1).unwrap();
        w.begin_part(4).unwrap();
        let err = w.write(TokenSlice::U32(&[70000]), &[0, 1], vec!["a".into()], "s", BTreeMap::new()).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
        let err = w.write(TokenSlice::U16(&[7]), &[0, 1], vec!["a".into()], "s", BTreeMap::new()).unwrap_err();
        assert!(err.contains("\"x\" is missing"), "{err}");
        w.abort();
        assert_eq!(listing(&dir), vec!["part-00000.parquet"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thread_errors_surface_on_the_next_call() {
        let dir = tempdir("error");
        let mut w = ShardWriter::new(&dir, TokenType::U32, vec![], 1).unwrap();
        // The directory vanishes, so the thread cannot create the part's file.
        fs::remove_dir_all(&dir).unwrap();
        w.begin_part(0).unwrap();
        let mut err = None;
        for _ in 0..50 {
            match w.write(TokenSlice::U32(&[1]), &[0, 1], vec!["a".into()], "s", BTreeMap::new()) {
                Err(e) => {
                    err = Some(e);
                    break;
                }
                Ok(()) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        let err = err.unwrap();
        assert!(err.contains("cannot create"), "{err}");
        // The OS error number travels with it, so the caller can say why (here: no such directory).
        assert!(matches!(err, ShardError::Io(IoFailure { errno: Some(2), .. })), "{err:?}");
        assert!(w.finish().unwrap_err().contains("cannot create"));
        let Err(err) = ShardWriter::new(&Path::new("/proc/version").join("x"), TokenType::U32, vec![], 1) else {
            panic!("a directory inside a file cannot be created");
        };
        assert!(matches!(err, ShardError::Io(IoFailure { errno: Some(e), .. }) if e != 0), "{err:?}");
    }
}
