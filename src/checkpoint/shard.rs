//! Sharded checkpoints (ZeRO-1, issue #20): [`ShardCheckpoint`], one rank's shard of
//! the state, and its conversions to and from the one-GPU [`Checkpoint`].

use std::{collections::BTreeMap, path::Path};

use super::{file, refuse, Checkpoint};
use crate::{
    config::TensorHyper,
    error::{Error, Result},
    shard::{Piece, ShardLayout},
    spec::lowbit::QBLOCK,
    state::TensorState,
};

/// The format of a rank's shard file.
pub(crate) const SHARD_FORMAT: &str = "adamax-cuda-shard/2";
/// Shard files from before 8-bit state stored `m` as a ratio (`super::legacy`): their
/// pieces load as a checkpoint of format `adamax-cuda/2`, their 8-bit state converted.
const SHARD_FORMAT_1: &str = "adamax-cuda-shard/1";

/// One rank's shard of a sharded optimizer's state: what the sharded optimizer's
/// `checkpoint` gives and its `restore` takes (`cuda::nccl::ShardedAdamax`, feature
/// `nccl`). Each rank saves the state of its shard of a [`ShardLayout`], and the
/// ranks' files convert to the one-GPU [`Checkpoint`] and back, at any world size.
///
/// A [`ShardCheckpoint`] is one rank's pieces of tensors as a [`Checkpoint`] of its own
/// (piece `i` its tensor `i`, of shape `[len]`, unnamed, with its whole tensor's step
/// count, settings and state format), plus what the whole list needs: the rank, the
/// world size, and every whole tensor's shape, name and settings (so that a rank's
/// file says everything a restore on that rank needs, and the files of a world make
/// the one-GPU checkpoint again). The layout is recomputed from the whole tensors'
/// sizes and the world size ([`ShardLayout::new`]: the format's contract; the shard
/// length is recorded and checked, so a file written by another layout is refused).
///
/// The file is the one-GPU file of the pieces (same tensors, same integrity checksum
/// over everything) whose `format` is `adamax-cuda-shard/2`, with these keys more:
///
/// | key | value |
/// | --- | --- |
/// | `shard.rank`, `shard.world_size`, `shard.shard_len`, `shard.tensors` | decimal integers: the rank, the layout's world size and shard length, the whole list's tensor count |
/// | `shard.tensor.{t}.shape` | whole tensor `t`'s shape, its dimensions joined by `,` (empty for a scalar) |
/// | `shard.tensor.{t}.name` | whole tensor `t`'s name, when it has one |
/// | `shard.tensor.{t}.lr_scale`, `shard.tensor.{t}.weight_decay` | whole tensor `t`'s settings |
///
/// [`Checkpoint::load`] refuses a shard file (and [`ShardCheckpoint::load`] a one-GPU
/// file), saying which to use. Every rank's file repeats the whole list's keys, so its
/// header (at most 100 MB, as every file's) reaches the limit at fewer tensors than a
/// one-GPU file's: about 200,000 named tensors at one rank.
///
/// Splitting ([`Checkpoint::shard`]) and gathering ([`ShardCheckpoint::gather`]) only
/// move values: a checkpoint split and gathered again is the same checkpoint (and
/// file) bit for bit, and [`ShardCheckpoint::reshard`] changes the world size (4 ranks'
/// files to 3, to 1, and back to 4 give the first 4 files' bytes again).
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer, ShardCheckpoint};
/// let w = vec![0.5f32; 20_000];
/// let opt = CpuAdamax::new(AdamaxConfig::default(), &[&w[..], &w[..100]])?;
/// let whole = opt.checkpoint()?;
/// let shards = whole.shard(3)?; // rank r's is shards[r]
/// let files = shards.iter().map(|s| s.to_bytes()).collect::<Result<Vec<_>, _>>()?;
/// let read = files.iter().map(|f| ShardCheckpoint::from_bytes(f)).collect::<Result<Vec<_>, _>>()?;
/// assert_eq!(ShardCheckpoint::gather(&read)?, whole);
/// assert_eq!(ShardCheckpoint::reshard(&read, 2)?.len(), 2);
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ShardCheckpoint {
    rank: usize,
    layout: ShardLayout,
    shapes: Vec<Vec<usize>>,
    names: Vec<Option<String>>,
    hypers: Vec<TensorHyper>,
    state: Checkpoint,
}

impl ShardCheckpoint {
    /// Rank `rank`'s shard of `layout`, whose whole tensors have `shapes`, `names` and
    /// `hypers`, holding `state` (the pieces' checkpoint); checked
    /// ([`ShardCheckpoint::validate`]).
    pub(crate) fn new(
        rank: usize,
        layout: ShardLayout,
        shapes: Vec<Vec<usize>>,
        names: Vec<Option<String>>,
        hypers: Vec<TensorHyper>,
        state: Checkpoint,
    ) -> Result<Self> {
        let ck = Self {
            rank,
            layout,
            shapes,
            names,
            hypers,
            state,
        };
        ck.validate()?;
        Ok(ck)
    }

    /// The rank whose shard this is.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks of the layout.
    pub fn world_size(&self) -> usize {
        self.layout.world_size()
    }

    /// The layout of the whole list over the ranks.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The pieces of tensors this shard holds, in order (tensor `i` of
    /// [`ShardCheckpoint::state`] is piece `i`).
    pub fn pieces(&self) -> Vec<Piece> {
        self.layout.pieces(self.rank)
    }

    /// Each whole tensor's shape.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Each whole tensor's name.
    pub fn names(&self) -> &[Option<String>] {
        &self.names
    }

    /// Each whole tensor's settings.
    pub fn hypers(&self) -> &[TensorHyper] {
        &self.hypers
    }

    /// The pieces' state: a checkpoint whose tensor `i` is piece `i`.
    pub fn state(&self) -> &Checkpoint {
        &self.state
    }

    /// Checks that the shard is whole and consistent: the rank in the layout, one
    /// shape, name and setting per whole tensor, each shape of its tensor's size, one
    /// state per piece of the piece's size and shape, unnamed, with its whole tensor's
    /// settings, and the pieces' checkpoint itself ([`Checkpoint::validate`]).
    pub fn validate(&self) -> Result<()> {
        let world = self.layout.world_size();
        if self.rank >= world {
            return Err(refuse(format!(
                "its rank {} is not in a world of {world} ranks",
                self.rank
            )));
        }
        let count = self.layout.lens().len();
        for (what, n) in [
            ("shapes", self.shapes.len()),
            ("names", self.names.len()),
            ("settings", self.hypers.len()),
        ] {
            if n != count {
                return Err(refuse(format!(
                    "it has {n} whole-tensor {what} for {count} tensors"
                )));
            }
        }
        for (t, (shape, &n)) in self.shapes.iter().zip(self.layout.lens()).enumerate() {
            if crate::state::shape_len(shape) != Some(n) {
                return Err(refuse(format!(
                    "whole tensor {t}'s shape {shape:?} does not hold its {n} elements"
                )));
            }
        }
        for h in &self.hypers {
            h.validate()?;
        }
        crate::state::check_names(&self.names).map_err(|e| refuse(e.to_string()))?;
        let pieces = self.pieces();
        let s = &self.state;
        if s.tensors.len() != pieces.len() {
            return Err(refuse(format!(
                "it holds {} tensors' state, but rank {} of the layout steps {} pieces",
                s.tensors.len(),
                self.rank,
                pieces.len()
            )));
        }
        for (i, p) in pieces.iter().enumerate() {
            let held = s.tensors[i].len();
            if held != p.len() || s.shapes[i] != [p.len()] || s.names[i].is_some() {
                return Err(refuse(format!(
                    "piece {i} (elements {}..{} of tensor {}) holds {held} elements, shape {:?}, name {:?}: a piece is unnamed, of shape [its length]",
                    p.begin, p.end, p.tensor, s.shapes[i], s.names[i]
                )));
            }
            if s.hypers[i] != self.hypers[p.tensor] {
                return Err(refuse(format!(
                    "piece {i}'s settings differ from those of its tensor {}",
                    p.tensor
                )));
            }
        }
        // A rank may hold no piece: its pieces' checkpoint then holds no tensor.
        s.validate_any(true)
    }

    /// The metadata of the file: the pieces' checkpoint's, in this format, with the
    /// shard's keys.
    fn metadata(&self) -> BTreeMap<String, String> {
        let mut meta = self.state.metadata();
        meta.insert("format".into(), SHARD_FORMAT.into());
        meta.extend(self.shard_keys());
        meta
    }

    /// The keys this format adds (the module's table).
    fn shard_keys(&self) -> BTreeMap<String, String> {
        let mut keys = BTreeMap::new();
        for (k, v) in [
            ("rank", self.rank),
            ("world_size", self.layout.world_size()),
            ("shard_len", self.layout.shard_len()),
            ("tensors", self.layout.lens().len()),
        ] {
            keys.insert(format!("shard.{k}"), v.to_string());
        }
        for (t, ((shape, name), h)) in self
            .shapes
            .iter()
            .zip(&self.names)
            .zip(&self.hypers)
            .enumerate()
        {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            keys.insert(format!("shard.tensor.{t}.shape"), dims.join(","));
            if let Some(name) = name {
                keys.insert(format!("shard.tensor.{t}.name"), name.clone());
            }
            keys.insert(format!("shard.tensor.{t}.lr_scale"), h.lr_scale.to_string());
            keys.insert(
                format!("shard.tensor.{t}.weight_decay"),
                h.weight_decay.to_string(),
            );
        }
        keys
    }

    /// Serialises to safetensors bytes (after [`ShardCheckpoint::validate`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        super::file_bytes(&self.state, self.plan()?)
    }

    /// Writes the shard to `path` atomically (after [`ShardCheckpoint::validate`]), as
    /// [`Checkpoint::save`] does.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        super::save_file(&self.state, self.plan()?, path.as_ref())
    }

    fn plan(&self) -> Result<file::Plan> {
        self.validate()?;
        let s = &self.state;
        file::Plan::new(
            self.metadata(),
            s.storage,
            &s.config.precision,
            &s.shapes,
            &s.state_formats,
        )
    }

    /// Parses and validates a shard file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_raw(super::read_bytes(bytes)?)
    }

    /// Reads and validates a shard file, as [`Checkpoint::load`] reads a checkpoint.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_raw(super::read_path(path.as_ref())?)
    }

    /// Everything checked: the checksum over the whole file, the format, the pieces'
    /// checkpoint as [`Checkpoint::load`] checks one, and the shard's keys, each as
    /// this crate writes it (no other key, no other spelling).
    fn from_raw(mut raw: file::RawFile) -> Result<Self> {
        let stored = raw.meta.get(file::CHECKSUM_KEY).cloned().ok_or_else(|| {
            refuse(format!(
                "it has no `{}`; shard files always carry one",
                file::CHECKSUM_KEY
            ))
        })?;
        file::verify_checksum(&raw, &stored)?;
        let inner = match raw.meta.get("format").map(String::as_str) {
            Some(SHARD_FORMAT) => super::FORMAT,
            Some(SHARD_FORMAT_1) => super::legacy::FORMAT_2,
            Some(super::FORMAT | super::legacy::FORMAT_2) => {
                return Err(refuse(
                    "it is a one-GPU checkpoint, not a rank's shard: load it with Checkpoint::load (Checkpoint::shard splits it over ranks)",
                ))
            }
            other => {
                return Err(refuse(format!(
                    "format {other:?}; expected `{SHARD_FORMAT}` (or `{SHARD_FORMAT_1}`, before 8-bit state changed)"
                )))
            }
        };
        let keys: BTreeMap<String, String> = raw
            .meta
            .iter()
            .filter(|(k, _)| k.starts_with("shard."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        raw.meta.retain(|k, _| !k.starts_with("shard."));
        raw.meta.insert("format".into(), inner.into());
        let state = Checkpoint::from_verified(raw, true)?;
        let key = |k: &str| {
            keys.get(k)
                .map(String::as_str)
                .ok_or_else(|| refuse(format!("metadata has no `{k}`")))
        };
        let count = |k: &str| -> Result<usize> {
            key(k)?
                .parse::<usize>()
                .map_err(|_| refuse(format!("metadata `{k}` is not a count")))
        };
        let rank = count("shard.rank")?;
        let world = count("shard.world_size")?;
        let tensors = count("shard.tensors")?;
        // Sized from the file's own tensor keys before anything is allocated.
        if tensors > keys.len() {
            return Err(refuse(format!(
                "metadata `shard.tensors` is {tensors}, more than the file describes"
            )));
        }
        let mut shapes = Vec::with_capacity(tensors);
        let mut names = Vec::with_capacity(tensors);
        let mut hypers = Vec::with_capacity(tensors);
        for t in 0..tensors {
            let dims = key(&format!("shard.tensor.{t}.shape"))?;
            let shape = if dims.is_empty() {
                Vec::new()
            } else {
                dims.split(',')
                    .map(str::parse::<usize>)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| {
                        refuse(format!("metadata `shard.tensor.{t}.shape` is not a shape"))
                    })?
            };
            shapes.push(shape);
            names.push(keys.get(&format!("shard.tensor.{t}.name")).cloned());
            let num = |k: String| -> Result<f64> {
                key(&k)?
                    .parse::<f64>()
                    .map_err(|_| refuse(format!("metadata `{k}` is not a number")))
            };
            hypers.push(TensorHyper {
                lr_scale: num(format!("shard.tensor.{t}.lr_scale"))?,
                weight_decay: num(format!("shard.tensor.{t}.weight_decay"))?,
            });
        }
        let lens = shapes
            .iter()
            .enumerate()
            .map(|(t, s)| {
                crate::state::shape_len(s).ok_or_else(|| {
                    refuse(format!("whole tensor {t}'s shape {s:?} holds more elements than an address can count"))
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        let layout = ShardLayout::new(&lens, world)
            .map_err(|e| refuse(format!("its layout cannot be: {e}")))?;
        let ck = Self::new(rank, layout, shapes, names, hypers, state)?;
        // Every key as this crate writes it, and no other: an edited value (`+5`, a
        // shard length from another layout) or a stray key is refused.
        let written = ck.shard_keys();
        if written != keys {
            let differs = written
                .iter()
                .find(|(k, v)| keys.get(*k) != Some(v))
                .map(|(k, v)| format!("`{k}` should be `{v}`, is {:?}", keys.get(k)))
                .or_else(|| {
                    keys.keys()
                        .find(|k| !written.contains_key(*k))
                        .map(|k| format!("`{k}` is not a key this format writes"))
                })
                .unwrap_or_default();
            return Err(refuse(format!(
                "its shard metadata is not as this crate writes it ({differs}); the file was edited, made by another program, or by another layout"
            )));
        }
        Ok(ck)
    }

    /// The one-GPU checkpoint of every rank's shard: `shards` holds each rank of one
    /// world exactly once (in any order), all of the same run (configuration, step,
    /// options, scaler, whole tensors). Refused ([`Error::Checkpoint`]): a missing or
    /// repeated rank, shards of different layouts or runs, pieces of one tensor whose
    /// step counts or settings differ.
    pub fn gather(shards: &[ShardCheckpoint]) -> Result<Checkpoint> {
        let first = shards
            .first()
            .ok_or_else(|| refuse("no shards were given; pass every rank's shard"))?;
        let world = first.world_size();
        // Sized by the shards given, not by what a file says the world is.
        let mut by_rank = BTreeMap::new();
        for s in shards {
            if let Some(what) = first.differs(s) {
                return Err(refuse(format!(
                    "the shards of ranks {} and {} are not of one run: {what}",
                    first.rank, s.rank
                )));
            }
            if by_rank.insert(s.rank, s).is_some() {
                return Err(refuse(format!("rank {}'s shard was given twice", s.rank)));
            }
        }
        if by_rank.len() != world {
            let missing = (0..world).find(|r| !by_rank.contains_key(r)).unwrap_or(0);
            return Err(refuse(format!(
                "rank {missing}'s shard is missing ({} of {world} given); pass every rank's",
                by_rank.len()
            )));
        }
        let count = first.layout.lens().len();
        let mut tensors: Vec<Option<TensorState>> = vec![None; count];
        let mut formats = vec![None; count];
        for (&rank, s) in &by_rank {
            for (i, p) in s.pieces().iter().enumerate() {
                let piece = &s.state.tensors[i];
                let format = s.state.state_formats[i];
                match (&mut tensors[p.tensor], formats[p.tensor]) {
                    (slot @ None, _) => {
                        *slot = Some(piece.clone());
                        formats[p.tensor] = Some(format);
                    }
                    (Some(whole), Some(f)) => {
                        if whole.step != piece.step || f != format {
                            return Err(refuse(format!(
                                "the pieces of tensor {} disagree on its step count or state format (rank {rank}'s piece from element {})",
                                p.tensor, p.begin
                            )));
                        }
                        append(whole, piece);
                    }
                    (Some(_), None) => {
                        return Err(Error::Internal {
                            what: "a gathered tensor without its state format",
                        })
                    }
                }
            }
        }
        let tensors = tensors
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(Error::Internal {
                what: "a layout left a tensor on no rank",
            })?;
        let state_formats =
            formats
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or(Error::Internal {
                    what: "a layout left a tensor on no rank",
                })?;
        let s = &first.state;
        let ck = Checkpoint {
            config: s.config,
            step: s.step,
            storage: s.storage,
            tensors,
            shapes: first.shapes.clone(),
            names: first.names.clone(),
            state_formats,
            hypers: first.hypers.clone(),
            options: s.options,
            scaler: s.scaler,
        };
        ck.validate()?;
        Ok(ck)
    }

    /// Refuses this shard for the optimizer of rank `rank` of `layout` unless it is
    /// that rank's of that layout, saying how to make the right one.
    pub(crate) fn check_place(&self, layout: &ShardLayout, rank: usize) -> Result<()> {
        if self.layout == *layout && self.rank == rank {
            return Ok(());
        }
        Err(refuse(format!(
            "it is rank {}'s shard of {} ranks over {} tensors; this optimizer steps rank {rank} of {} over {} (ShardCheckpoint::reshard makes the shards of another world size)",
            self.rank,
            self.world_size(),
            self.layout.lens().len(),
            layout.world_size(),
            layout.lens().len()
        )))
    }

    /// What differs between this shard's run and `other`'s, if anything.
    fn differs(&self, other: &ShardCheckpoint) -> Option<String> {
        let (a, b) = (&self.state, &other.state);
        if self.layout != other.layout {
            return Some(format!(
                "their layouts differ (worlds of {} and {} ranks, over {} and {} tensors)",
                self.world_size(),
                other.world_size(),
                self.layout.lens().len(),
                other.layout.lens().len()
            ));
        }
        if a.step != b.step {
            return Some(format!("they are at steps {} and {}", a.step, b.step));
        }
        [
            (self.shapes != other.shapes, "the whole tensors' shapes"),
            (self.names != other.names, "the whole tensors' names"),
            (self.hypers != other.hypers, "the whole tensors' settings"),
            (a.config != b.config, "the configurations"),
            (a.storage != b.storage, "the parameter types"),
            (a.options != b.options, "the step options"),
            (a.scaler != b.scaler, "the loss scalers"),
        ]
        .into_iter()
        .find(|(differ, _)| *differ)
        .map(|(_, what)| format!("{what} differ"))
    }

    /// The shards of every rank of `shards`' world gathered and split again over
    /// `world_size` ranks ([`ShardCheckpoint::gather`], [`Checkpoint::shard`]).
    pub fn reshard(shards: &[ShardCheckpoint], world_size: usize) -> Result<Vec<ShardCheckpoint>> {
        Self::gather(shards)?.shard(world_size)
    }
}

impl Checkpoint {
    /// This checkpoint split over `world_size` ranks of the [`ShardLayout`] of its
    /// tensors: rank `r`'s shard is element `r` (checked first:
    /// [`Checkpoint::validate`]). Every rank's shard is built in memory; a rank that
    /// resumes from a one-GPU checkpoint needs only its own: [`Checkpoint::shard_of`].
    pub fn shard(&self, world_size: usize) -> Result<Vec<ShardCheckpoint>> {
        let layout = self.layout_over(world_size)?;
        (0..world_size)
            .map(|rank| self.shard_in(&layout, rank))
            .collect()
    }

    /// Rank `rank`'s shard of this checkpoint split over `world_size` ranks (element
    /// `rank` of [`Checkpoint::shard`]); a rank outside the world is refused
    /// ([`Error::InvalidLayout`]).
    pub fn shard_of(&self, world_size: usize, rank: usize) -> Result<ShardCheckpoint> {
        let layout = self.layout_over(world_size)?;
        if rank >= world_size {
            return Err(Error::InvalidLayout {
                reason: format!(
                    "rank {rank} is not in a world of {world_size} ranks (0..{world_size})"
                ),
            });
        }
        self.shard_in(&layout, rank)
    }

    /// The layout of this checkpoint's tensors over `world_size` ranks (after
    /// [`Checkpoint::validate`]).
    fn layout_over(&self, world_size: usize) -> Result<ShardLayout> {
        self.validate()?;
        let lens: Vec<usize> = self.tensors.iter().map(TensorState::len).collect();
        ShardLayout::new(&lens, world_size)
    }

    /// Rank `rank`'s shard of `layout`, this checkpoint's.
    fn shard_in(&self, layout: &ShardLayout, rank: usize) -> Result<ShardCheckpoint> {
        let pieces = layout.pieces(rank);
        let state = Checkpoint {
            config: self.config,
            step: self.step,
            storage: self.storage,
            tensors: pieces
                .iter()
                .map(|p| slice(&self.tensors[p.tensor], p.begin, p.end))
                .collect(),
            shapes: pieces.iter().map(|p| vec![p.len()]).collect(),
            names: vec![None; pieces.len()],
            state_formats: pieces
                .iter()
                .map(|p| self.state_formats[p.tensor])
                .collect(),
            hypers: pieces.iter().map(|p| self.hypers[p.tensor]).collect(),
            options: self.options,
            scaler: self.scaler,
        };
        ShardCheckpoint::new(
            rank,
            layout.clone(),
            self.shapes.clone(),
            self.names.clone(),
            self.hypers.clone(),
            state,
        )
    }
}

/// Elements `begin..end` of a tensor's state (`begin` a multiple of the 8-bit block,
/// as every piece's first element is).
pub(crate) fn slice(t: &TensorState, begin: usize, end: usize) -> TensorState {
    let part = |v: &[f32]| {
        if v.is_empty() {
            Vec::new()
        } else {
            v[begin..end].to_vec()
        }
    };
    let blocks = begin / QBLOCK..end.div_ceil(QBLOCK);
    let q8 = |b: &crate::spec::lowbit::Blockwise8| {
        let mut out = crate::spec::lowbit::Blockwise8::default();
        if !b.codes.is_empty() {
            out.codes = b.codes[begin..end].to_vec();
            out.scales = b.scales[blocks.clone()].to_vec();
        }
        out
    };
    TensorState {
        step: t.step,
        exp_avg: part(&t.exp_avg),
        exp_inf: part(&t.exp_inf),
        master: part(&t.master),
        exp_avg_q8: q8(&t.exp_avg_q8),
        exp_inf_q8: q8(&t.exp_inf_q8),
    }
}

/// `piece` appended to `whole` (whose end is a multiple of the 8-bit block, as every
/// piece but a tensor's last ends).
fn append(whole: &mut TensorState, piece: &TensorState) {
    whole.exp_avg.extend_from_slice(&piece.exp_avg);
    whole.exp_inf.extend_from_slice(&piece.exp_inf);
    whole.master.extend_from_slice(&piece.master);
    for (w, p) in [
        (&mut whole.exp_avg_q8, &piece.exp_avg_q8),
        (&mut whole.exp_inf_q8, &piece.exp_inf_q8),
    ] {
        w.codes.extend_from_slice(&p.codes);
        w.scales.extend_from_slice(&p.scales);
    }
}
