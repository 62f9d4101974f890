//! A model folder's tensors, from whichever of Hugging Face's layouts it uses.
//!
//! Files are memory-mapped; a contiguous tensor is a slice of its map (no copy, no read
//! until used), which is what lets a 26 GB model "open" instantly. Only tensors that a
//! PyTorch .bin stores as a strided view are gathered into an owned buffer on request.
//!
//! Tools that stream a whole model once (apply-delta, verification) read through
//! [`Checkpoint::read_bytes_at`] instead: positioned reads into the caller's buffer, because
//! every page of a map that is touched stays in the process's resident set until unmapped.

use crate::config::LlamaConfig;
use crate::dtype::{to_f32_vec, DType, SUPPORTED_DTYPES};
use crate::error::{bail, Error, Result};
use crate::pickle::{self, StorageKind};
use crate::{safetensors, zip};
use memmap2::{Mmap, UncheckedAdvice};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The output head of transformers' `LlamaForSequenceClassification` (a reward model's).
const SCORE_WEIGHT: &str = "score.weight";
const LM_HEAD_WEIGHT: &str = "lm_head.weight";
const SEQUENCE_CLASSIFIER: &str = "LlamaForSequenceClassification";

/// What a LLaMA trunk ends in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// `LlamaForCausalLM`: `lm_head.weight` `[vocab, hidden]`, absent when tied to the embedding.
    LanguageModel,
    /// `LlamaForSequenceClassification`: `score.weight` `[labels, hidden]` read at the last token, no
    /// `lm_head` (a reward model has one label).
    Score { labels: usize },
}

/// Name, element type, shape and file of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The file (shard) holding it.
    pub file: PathBuf,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// All tensors of a model folder.
pub struct Checkpoint {
    dir: PathBuf,
    maps: Vec<Mmap>,
    /// The open file behind each map, for positioned reads.
    files: Vec<File>,
    tensors: BTreeMap<String, Stored>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.maps.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Stored {
    info: TensorInfo,
    /// Index into `Checkpoint::maps`.
    map: usize,
    layout: Layout,
}

pub(crate) enum Layout {
    /// Row-major bytes at this range of the file.
    Contiguous(Range<usize>),
    /// A PyTorch view: element `offset + Σ index_i × stride_i` of the storage at `storage`.
    Strided { storage: Range<usize>, offset: usize, stride: Vec<usize> },
}

/// Tensors present in checkpoints that are not weights: the 2023 LLaMA code saved its RoPE
/// frequency buffer (`rotary_emb.inv_freq`) with the model; it is recomputed from the config.
pub(crate) fn is_ignored(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// The weight layouts Hugging Face writes.
enum Layouts {
    Safetensors(PathBuf),
    SafetensorsIndex(PathBuf),
    Bin(PathBuf),
    BinIndex(PathBuf),
}

impl Checkpoint {
    /// Opens the weights of a model folder: `model.safetensors`, a sharded safetensors
    /// index, `pytorch_model.bin`, or a sharded .bin index (the first found, in that order).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!(
                "model folder {} does not exist or is not a folder; pass the folder that holds config.json and the weights",
                dir.display()
            );
        }
        let mut checkpoint =
            Checkpoint { dir: dir.to_path_buf(), maps: Vec::new(), files: Vec::new(), tensors: BTreeMap::new() };
        match detect(dir)? {
            Layouts::Safetensors(path) | Layouts::Bin(path) => checkpoint.load_file(&path)?,
            Layouts::SafetensorsIndex(index) | Layouts::BinIndex(index) => checkpoint.load_index(&index)?,
        }
        if checkpoint.tensors.is_empty() {
            bail!("{} holds no tensors; its weight files are empty — download them again", dir.display());
        }
        Ok(checkpoint)
    }

    /// Opens one safetensors file on its own (a PEFT adapter's `adapter_model.safetensors`, which sits beside, not
    /// among, a model's weights).
    pub fn open_safetensors(path: &Path) -> Result<Checkpoint> {
        if !path.is_file() {
            bail!("{} does not exist or is not a file", path.display());
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut checkpoint = Checkpoint { dir, maps: Vec::new(), files: Vec::new(), tensors: BTreeMap::new() };
        checkpoint.load_file(path)?;
        Ok(checkpoint)
    }

    /// The model folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tensor names, sorted (ignored `inv_freq` buffers are not listed).
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Name, dtype, shape and file of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|t| &t.info)
    }

    /// The tensor's data: little-endian, row-major contiguous elements of its dtype.
    /// Borrowed from the memory map unless the file stores the tensor as a strided view.
    pub fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let stored = self.stored(name)?;
        let map = &self.maps[stored.map];
        match &stored.layout {
            Layout::Contiguous(range) => Ok(Cow::Borrowed(&map[range.clone()])),
            Layout::Strided { storage, offset, stride } => {
                let es = stored.info.dtype.size_in_bytes();
                let numel = stored.info.numel();
                let mut out = vec![0u8; numel * es];
                gather(&map[storage.clone()], es, *offset, &stored.info.shape, stride, 0..numel, &mut out);
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Copies bytes `offset .. offset + out.len()` of the tensor's data (as [`Checkpoint::bytes`]
    /// returns it: row-major, little-endian) into `out`.
    ///
    /// Contiguous tensors are read with positioned reads (`pread`), not through the memory map,
    /// so streaming a whole model leaves no file pages in this process's resident set. A strided
    /// view is gathered through the map, whose pages are then released again (`MADV_DONTNEED`;
    /// the file is only read, so they are simply re-read should they be needed again).
    pub fn read_bytes_at(&self, name: &str, offset: usize, out: &mut [u8]) -> Result<()> {
        let stored = self.stored(name)?;
        let info = &stored.info;
        let es = info.dtype.size_in_bytes();
        let len = info.numel() * es;
        let end = offset.checked_add(out.len()).filter(|&end| end <= len);
        let Some(end) = end else {
            bail!(
                "cannot read bytes {offset}..{} of tensor {name} in {}: it holds {len} bytes",
                offset.saturating_add(out.len()),
                info.file.display()
            );
        };
        match &stored.layout {
            Layout::Contiguous(range) => {
                self.files[stored.map].read_exact_at(out, (range.start + offset) as u64).map_err(|e| {
                    Error::new(format!(
                        "cannot read tensor {name} from {}: {e}; the file changed or is damaged — download it again",
                        info.file.display()
                    ))
                })
            }
            Layout::Strided { storage, offset: first, stride } => {
                if !offset.is_multiple_of(es) || !end.is_multiple_of(es) {
                    bail!(
                        "cannot read bytes {offset}..{end} of tensor {name}: not a whole number of {} elements",
                        info.dtype
                    );
                }
                let map = &self.maps[stored.map];
                gather(&map[storage.clone()], es, *first, &info.shape, stride, offset / es..end / es, out);
                // SAFETY: the map is a read-only file mapping that nothing writes through, so its
                // pages only ever hold the file's bytes: dropping them loses nothing, and any later
                // access (including through slices `bytes` handed out) re-reads them from the file.
                unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, storage.start, storage.len()) }
                    .map_err(|e| Error::new(format!("cannot release pages of {}: {e}", info.file.display())))
            }
        }
    }

    /// The tensor's elements widened to f32 (exact for f16 and bf16).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let dtype = self.stored(name)?.info.dtype;
        Ok(to_f32_vec(dtype, &self.bytes(name)?))
    }

    /// Checks that every tensor `config` implies for a causal LM (`LlamaForCausalLM`: the trunk and
    /// `lm_head.weight`) exists with its shape, and that nothing else is there; every problem is
    /// listed in the one error.
    pub fn check_against(&self, config: &LlamaConfig) -> Result<()> {
        self.check_with_head(config, Head::LanguageModel)
    }

    /// [`Checkpoint::check_against`] for transformers' `LlamaForSequenceClassification` with
    /// `labels` outputs (a reward model has one): `score.weight` `[labels, hidden]` instead of `lm_head`.
    pub fn check_against_score_head(&self, config: &LlamaConfig, labels: usize) -> Result<()> {
        self.check_with_head(config, Head::Score { labels })
    }

    fn check_with_head(&self, config: &LlamaConfig, head: Head) -> Result<()> {
        // A reward model has no lm_head to generate with; saying so beats listing the two tensors.
        if head == Head::LanguageModel && self.is_score_head_folder(config) {
            bail!(
                "{} is a reward model (LlamaForSequenceClassification, with {SCORE_WEIGHT} instead of {LM_HEAD_WEIGHT}) and cannot \
                 generate or score text; read it with `vicuna reward`",
                self.dir.display()
            );
        }
        let mut expected = config.expected_shapes();
        if let Head::Score { labels } = head {
            expected.retain(|(name, _)| name != LM_HEAD_WEIGHT);
            expected.push((SCORE_WEIGHT.to_string(), vec![labels, config.hidden_size]));
        }
        let mut problems = Vec::new();
        for (name, shape) in &expected {
            match self.info(name) {
                None => problems.push(format!("{name} is missing (config.json implies shape {shape:?})")),
                Some(info) if &info.shape != shape => problems.push(format!(
                    "{name} in {} has shape {:?} but config.json implies {shape:?}",
                    info.file.display(),
                    info.shape
                )),
                Some(_) => {}
            }
        }
        let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for info in self.tensors.values().map(|t| &t.info) {
            // A tied model may still carry lm_head.weight; transformers ignores it too.
            let tolerated = config.tie_word_embeddings && info.name == LM_HEAD_WEIGHT;
            if !known.contains(info.name.as_str()) && !tolerated {
                problems.push(format!(
                    "unexpected tensor {} in {} (config.json describes {} layers)",
                    info.name,
                    info.file.display(),
                    config.num_hidden_layers
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::new(format!(
            "the weights in {} do not match config.json ({} problem{}): {}; check that config.json belongs to these weights",
            self.dir.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("; ")
        )))
    }

    /// Whether config and weights are transformers' `LlamaForSequenceClassification`.
    fn is_score_head_folder(&self, config: &LlamaConfig) -> bool {
        config.architectures.iter().any(|a| a == SEQUENCE_CLASSIFIER) && self.info(SCORE_WEIGHT).is_some()
    }

    fn stored(&self, name: &str) -> Result<&Stored> {
        self.tensors.get(name).ok_or_else(|| Error::new(format!("no tensor named {name} in {}", self.dir.display())))
    }

    /// Reads a sharded layout: the index's `weight_map` names a shard per tensor.
    fn load_index(&mut self, index: &Path) -> Result<()> {
        let index_name = file_name(index);
        let text = std::fs::read(index).map_err(|e| Error::new(format!("cannot read {}: {e}", index.display())))?;
        let json: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::new(format!("{} is not valid JSON ({e}); download it again", index.display())))?;
        let weight_map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::new(format!("{} has no `weight_map` object; download it again", index.display())))?;
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::new(format!("{}: weight_map entry {tensor} is not a file name", index.display()))
            })?;
            // A shard must sit in this folder: an index is downloaded data and must not
            // make vicuna read (or report on) files elsewhere.
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == "." || shard == ".." {
                bail!(
                    "{} names shard {shard:?} for {tensor}, which is not a plain file name in the model folder",
                    index.display()
                );
            }
            wanted.insert(tensor, shard);
        }
        let shards: BTreeSet<&str> = wanted.values().copied().collect();
        for shard in &shards {
            if !self.dir.join(shard).is_file() {
                bail!(
                    "{index_name} names {shard}, which is missing from {}; download that shard too",
                    self.dir.display()
                );
            }
        }
        for shard in &shards {
            self.load_file(&self.dir.join(shard))?;
        }
        let mut problems = Vec::new();
        for (tensor, shard) in &wanted {
            if is_ignored(tensor) {
                continue;
            }
            let found = self.tensors.get(*tensor).map(|t| file_name(&t.info.file));
            if found.as_deref() != Some(*shard) {
                problems.push(format!("{index_name} lists {tensor} in {shard}, but {shard} does not contain it"));
            }
        }
        if !problems.is_empty() {
            bail!(
                "{}; the shards and the index come from different downloads — download the model folder again",
                problems.join("; ")
            );
        }
        Ok(())
    }

    /// Maps one weight file and adds its tensors.
    fn load_file(&mut self, path: &Path) -> Result<()> {
        let (file, map) = map_file(path)?;
        let index = self.maps.len();
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let found = if is_safetensors {
            safetensors::read_entries(&map, path, is_ignored)?
                .into_iter()
                .map(|e| (e.name.clone(), e.dtype, e.shape, Layout::Contiguous(e.data)))
                .collect()
        } else {
            read_pytorch(&map, path)?
        };
        for (name, dtype, shape, layout) in found {
            if let Some(previous) = self.tensors.get(&name) {
                bail!(
                    "tensor {name} is in both {} and {}; the folder mixes files of different downloads",
                    previous.info.file.display(),
                    path.display()
                );
            }
            let info = TensorInfo { name: name.clone(), dtype, shape, file: path.to_path_buf() };
            self.tensors.insert(name, Stored { info, map: index, layout });
        }
        self.maps.push(map);
        self.files.push(file);
        Ok(())
    }
}

/// Which layout the folder uses, or an error that says what is there instead. The order is
/// transformers' `from_pretrained`: safetensors before pickles, a single file before an index.
fn detect(dir: &Path) -> Result<Layouts> {
    type Make = fn(PathBuf) -> Layouts;
    let candidates: [(&str, Make); 4] = [
        ("model.safetensors", Layouts::Safetensors),
        ("model.safetensors.index.json", Layouts::SafetensorsIndex),
        ("pytorch_model.bin", Layouts::Bin),
        ("pytorch_model.bin.index.json", Layouts::BinIndex),
    ];
    for (name, layout) in candidates {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(layout(path));
        }
    }
    // Nothing standard: say what is there, since the fix differs.
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    let d = dir.display();
    if names.iter().any(|n| n.ends_with(".pth")) {
        bail!(
            "no Hugging Face weights in {d}: it holds .pth files, Meta's original LLaMA format; convert them \
             with transformers' convert_llama_weights_to_hf.py first"
        );
    }
    if let Some(shard) = names.iter().find(|n| n.ends_with(".safetensors") || n.ends_with(".bin")) {
        bail!(
            "no model.safetensors, pytorch_model.bin or index file in {d}, only {shard}: the index \
             (model.safetensors.index.json / pytorch_model.bin.index.json) of a sharded download is missing"
        );
    }
    bail!(
        "no weights in {d}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin \
         or pytorch_model.bin.index.json"
    )
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn map_file(path: &Path) -> Result<(File, Mmap)> {
    let file = File::open(path).map_err(|e| Error::new(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        bail!("{} is empty; the download is incomplete — download it again", path.display());
    }
    // SAFETY: the map is only read. As with every mmap-based loader (safetensors, candle),
    // another process truncating the file while it is mapped would fault; vicuna writes model
    // files only into a fresh folder, never over files it reads, and copying 26 GB into memory
    // instead is not an option.
    let map =
        unsafe { Mmap::map(&file) }.map_err(|e| Error::new(format!("cannot memory-map {}: {e}", path.display())))?;
    Ok((file, map))
}

pub(crate) type Found = Vec<(String, DType, Vec<usize>, Layout)>;

/// The tensors of a PyTorch zip checkpoint: unpickle `data.pkl` (restricted) and point
/// each tensor at its storage entry `<archive>/data/<key>`.
pub(crate) fn read_pytorch(map: &[u8], path: &Path) -> Result<Found> {
    let f = path.display();
    if map.first() == Some(&0x80) {
        bail!(
            "{f} is a legacy (pre-1.6) torch.save file, not a zip archive; vicuna does not read it: \
             re-save it with a recent torch.save or convert it to safetensors"
        );
    }
    let entries = zip::read_entries(map, path)?;
    let pkl = entries
        .iter()
        .filter(|e| e.name.ends_with("/data.pkl") || e.name == "data.pkl")
        .min_by_key(|e| e.name.matches('/').count())
        .ok_or_else(|| Error::new(format!("{f} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)")))?;
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()]; // "archive/" (or "")
    let by_name: HashMap<&str, &Range<usize>> = entries.iter().map(|e| (e.name.as_str(), &e.data)).collect();

    if let Some(range) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let order = &map[(*range).clone()];
        if order != b"little" {
            bail!(
                "{f} was saved with byteorder {:?}; vicuna reads little-endian checkpoints only: re-save it \
                 on a little-endian machine or convert it to safetensors",
                String::from_utf8_lossy(order)
            );
        }
    }

    let tensors = pickle::load_state_dict(&map[pkl.data.clone()], path)?;
    let mut found = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if is_ignored(&name) {
            continue;
        }
        let storage = &tensor.storage;
        let dtype = match storage.kind {
            StorageKind::Supported(dtype) => dtype,
            StorageKind::Unsupported(what) => {
                bail!("unsupported dtype {what} for tensor {name} in {f}; {SUPPORTED_DTYPES}")
            }
        };
        let damaged =
            |what: String| Error::new(format!("{f}: tensor {name} {what}; the file is damaged — download it again"));
        let entry_name = format!("{prefix}data/{}", storage.key);
        let range = *by_name.get(entry_name.as_str()).ok_or_else(|| {
            damaged(format!("uses storage {}, but the archive has no entry {entry_name}", storage.key))
        })?;
        let es = dtype.size_in_bytes() as u64;
        let storage_bytes = storage.numel.checked_mul(es).filter(|&n| n <= range.len() as u64).ok_or_else(|| {
            damaged(format!(
                "uses storage {} of {} elements, but its entry holds only {} bytes",
                storage.key,
                storage.numel,
                range.len()
            ))
        })?;
        let storage_range = range.start..range.start + storage_bytes as usize;

        let to_usize = |v: &[u64]| v.iter().map(|&x| usize::try_from(x).ok()).collect::<Option<Vec<usize>>>();
        let (Some(shape), Some(stride)) = (to_usize(&tensor.shape), to_usize(&tensor.stride)) else {
            return Err(damaged("has an absurd size or stride".to_string()));
        };
        let offset = usize::try_from(tensor.offset).map_err(|_| damaged("has an absurd storage offset".to_string()))?;
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let Some(numel) = numel else {
            return Err(damaged(format!("has an absurd shape {shape:?}")));
        };

        let layout = if numel == 0 {
            Layout::Contiguous(storage_range.start..storage_range.start)
        } else {
            // The last element the view touches must lie inside the storage.
            let last =
                shape.iter().zip(&stride).try_fold(offset, |acc, (&d, &s)| acc.checked_add((d - 1).checked_mul(s)?));
            match last {
                Some(last) if (last as u64) < storage.numel => {}
                _ => {
                    return Err(damaged(format!(
                    "(shape {shape:?}, stride {stride:?}, offset {offset}) reaches past the {} elements of storage {}",
                    storage.numel, storage.key
                )))
                }
            }
            let es = es as usize;
            if is_row_major(&shape, &stride) {
                let start = storage_range.start + offset * es;
                Layout::Contiguous(start..start + numel * es)
            } else {
                Layout::Strided { storage: storage_range, offset, stride }
            }
        };
        found.push((name, dtype, shape, layout));
    }
    Ok(found)
}

/// Whether `stride` is the row-major stride of `shape` (dimensions of size 1 may have any).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies row-major elements `elements` of a strided view into `out` (which holds exactly
/// those elements). Bounds were checked when the file was opened.
pub(crate) fn gather(
    storage: &[u8],
    es: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    elements: Range<usize>,
    out: &mut [u8],
) {
    debug_assert_eq!(out.len(), elements.len() * es);
    if elements.is_empty() {
        return;
    }
    // The multi-index of the first element, last dimension fastest.
    let mut index = vec![0usize; shape.len()];
    let mut rest = elements.start;
    for dim in (0..shape.len()).rev() {
        index[dim] = rest % shape[dim];
        rest /= shape[dim];
    }
    for dst in out.chunks_exact_mut(es) {
        let element = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        dst.copy_from_slice(&storage[element * es..(element + 1) * es]);
        // Advance the multi-index like an odometer, last dimension fastest.
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            if index[dim] < shape[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
}
