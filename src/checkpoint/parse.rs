//! Validating what `file::read` found: the checkpoint built from a file's metadata and
//! tensors, every field checked, before any optimizer sees it.

use std::collections::HashMap;

use super::{file, legacy, refuse, Checkpoint, Data, Entry, MetaName, Part, FORMAT, TORCH_FORMAT};
use crate::{
    config::{AdamaxConfig, ParamMode, Precision, StateFormat, TensorHyper, DEFAULT_MIN_8BIT_LEN},
    error::Result,
    fused::{LossScaler, StepOptions},
    spec::lowbit::QBLOCK,
    state::TensorState,
    storage::StorageType,
};

impl Checkpoint {
    /// Validates what [`file::read`] found and builds the checkpoint from it.
    pub(super) fn from_raw(raw: file::RawFile) -> Result<Self> {
        if let Some(stored) = raw.meta.get(file::CHECKSUM_KEY) {
            file::verify_checksum(&raw, stored)?;
        }
        Self::from_verified(raw, false)
    }

    /// [`Checkpoint::from_raw`] once the checksum, if any, has been verified (a shard
    /// file's is verified before its own keys are taken out); `allow_empty` for the
    /// pieces of a rank's shard, which may hold none.
    pub(super) fn from_verified(raw: file::RawFile, allow_empty: bool) -> Result<Self> {
        let file::RawFile {
            meta,
            tensors: mut entries_in_file,
        } = raw;
        let get = |k: &str| {
            meta.get(k)
                .map(String::as_str)
                .ok_or_else(|| refuse(format!("metadata has no `{k}`")))
        };
        let format = get("format")?;
        if format == super::shard::SHARD_FORMAT {
            return Err(refuse(format!(
                "format `{format}` is one rank's shard of a sharded optimizer's state; load it with ShardCheckpoint::load, and make the one-GPU checkpoint of every rank's shard with ShardCheckpoint::gather"
            )));
        }
        // This crate's files before 8-bit state stored m as a ratio: read as this
        // crate's, their 8-bit state converted (super::legacy).
        let format_2 = format == legacy::FORMAT_2;
        let ours = format == FORMAT || format_2;
        if !ours && format != TORCH_FORMAT {
            return Err(refuse(format!(
                "format `{format}`; expected `{FORMAT}` (or `{}`, before 8-bit state changed) or `{TORCH_FORMAT}`",
                legacy::FORMAT_2
            )));
        }
        if format == TORCH_FORMAT {
            check_torch_keys(&meta)?;
        }
        if ours && !meta.contains_key(file::CHECKSUM_KEY) {
            return Err(refuse(format!(
                "it has no `{}`; files of format {format} always carry one",
                file::CHECKSUM_KEY
            )));
        }
        let num = |k: &str| -> Result<f64> {
            get(k)?
                .parse::<f64>()
                .map_err(|_| refuse(format!("metadata `{k}` is not a number")))
        };
        let count = |k: &str| -> Result<u64> {
            get(k)?
                .parse::<u64>()
                .map_err(|_| refuse(format!("metadata `{k}` is not a count")))
        };
        fn mode<M: MetaName>(key: &str, value: &str) -> Result<M> {
            M::from_meta(value).ok_or_else(|| refuse(format!("unknown {key} `{value}`")))
        }
        let storage: StorageType = get("storage")?.parse().map_err(refuse)?;
        let optional = |k: &str| meta.get(k).map(String::as_str);
        let precision = Precision {
            params: optional("param_mode")
                .map_or(Ok(ParamMode::Master), |v| mode("param_mode", v))?,
            state: optional("state_format")
                .map_or(Ok(StateFormat::F32), |v| mode("state_format", v))?,
            seed: if meta.contains_key("seed") {
                count("seed")?
            } else {
                0
            },
            min_8bit_len: match optional("min_8bit_len") {
                // Written with 8-bit state since tensors could keep f32 state (an 8-bit
                // file from before holds every tensor in 8 bits), and with f32 state when
                // not the default (PyTorch's files have the default).
                None if optional("state_format").is_some() => 0,
                None => DEFAULT_MIN_8BIT_LEN,
                Some(_) => usize::try_from(count("min_8bit_len")?)
                    .map_err(|_| refuse("metadata `min_8bit_len` is beyond usize"))?,
            },
        };
        if ours && precision.is_random() && !meta.contains_key("seed") {
            return Err(refuse(
                "it has no `seed`, which this crate writes for every mode that rounds stochastically; the file was edited or made by another program",
            ));
        }
        if precision.state == StateFormat::Blockwise8 && get("state_block")? != QBLOCK.to_string() {
            return Err(refuse(format!(
                "its 8-bit state has blocks of {} elements; this version reads blocks of {QBLOCK}",
                get("state_block")?
            )));
        }
        let config = AdamaxConfig {
            lr: num("lr")?,
            beta1: num("beta1")?,
            beta2: num("beta2")?,
            eps: num("eps")?,
            weight_decay: num("weight_decay")?,
            eps_mode: mode("eps_mode", get("eps_mode")?)?,
            weight_decay_mode: mode("weight_decay_mode", get("weight_decay_mode")?)?,
            maximize: match get("maximize")? {
                "true" => true,
                "false" => false,
                other => return Err(refuse(format!("maximize is `{other}`"))),
            },
            precision,
        };
        config.validate()?;
        let step = count("step")?;
        // The count is checked against the entries the file holds before anything is
        // sized from it: each tensor has at least its step, and the entries of its state
        // format.
        let mismatch = |per_tensor: String| {
            refuse(format!(
                "metadata says {} tensors of {storage} parameters, but the file holds {} entries ({per_tensor})",
                meta.get("tensors").map_or("?", String::as_str),
                entries_in_file.len(),
            ))
        };
        let n_tensors = usize::try_from(count("tensors")?)
            .ok()
            .filter(|&n| n <= entries_in_file.len())
            .ok_or_else(|| mismatch("at least one per tensor".into()))?;
        let formats = (0..n_tensors)
            .map(|i| {
                optional(&format!("tensor.{i}.state_format"))
                    .map_or(Ok(precision.state), |v| mode("state_format", v))
            })
            .collect::<Result<Vec<StateFormat>>>()?;
        // A tensor labelled with one format whose file entries are the other's.
        for (i, &f) in formats.iter().enumerate() {
            let first = |f: StateFormat| match f {
                StateFormat::F32 => Entry::Part(Part::ExpAvg).name(i),
                StateFormat::Blockwise8 => Entry::Part(Part::ExpAvgCodes).name(i),
            };
            let other = match f {
                StateFormat::F32 => StateFormat::Blockwise8,
                StateFormat::Blockwise8 => StateFormat::F32,
            };
            if !entries_in_file.contains_key(&first(f))
                && entries_in_file.contains_key(&first(other))
            {
                return Err(refuse(format!(
                    "tensor {i} is labelled {} state (its `tensor.{i}.state_format`, or the file's `state_format` without one) but the file holds its `{}`",
                    f.meta_name(),
                    first(other)
                )));
            }
        }
        let per_tensor: Vec<Vec<Entry>> = formats
            .iter()
            .map(|&f| Entry::of(storage, &precision.with_state(f)))
            .collect();
        if per_tensor.iter().map(Vec::len).sum::<usize>() != entries_in_file.len() {
            let counts = [StateFormat::F32, StateFormat::Blockwise8].map(|f| {
                format!(
                    "{} per tensor of {} state",
                    Entry::of(storage, &precision.with_state(f)).len(),
                    f.meta_name()
                )
            });
            return Err(mismatch(counts.join(", ")));
        }
        // `shape`: the one expected and the entry it comes from (`None`: from the
        // tensor's element count), or `None` for a tensor's first per-element entry,
        // whose shape (any, N-D as PyTorch's) is then the tensor's.
        let mut take = |entry: Entry,
                        i: usize,
                        shape: Option<(&[usize], Option<&str>)>|
         -> Result<(Data, Vec<usize>)> {
            let name = entry.name(i);
            let t = entries_in_file
                .remove(&name)
                .ok_or_else(|| refuse(format!("`{name}` is missing")))?;
            let fits = crate::state::shape_len(&t.shape) == Some(t.data.len());
            if !fits || shape.is_some_and(|(s, _)| t.shape != s) {
                return Err(refuse(format!(
                    "`{name}` has shape {:?}{}, expected {}",
                    t.shape,
                    if fits {
                        String::new()
                    } else {
                        format!(" but {} values", t.data.len())
                    },
                    match shape {
                        None => "its tensor's".to_owned(),
                        Some((s, Some(from))) => format!("{s:?}, the shape of `{from}`"),
                        Some((s, None)) => format!("{s:?}"),
                    }
                )));
            }
            if t.data.elem() != entry.elem() {
                return Err(refuse(format!(
                    "`{name}` is {:?}, expected {:?}",
                    file::dtype(t.data.elem()),
                    file::dtype(entry.elem())
                )));
            }
            Ok((t.data, t.shape))
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut shapes = Vec::with_capacity(n_tensors);
        for (i, entries) in per_tensor.iter().enumerate() {
            let mut state = TensorState::default();
            // The first per-element entry fixes the tensor's shape (so its element
            // count); the others must agree with it, and the block scales with the count.
            let mut shape: Option<(Vec<usize>, String)> = None;
            for &e in entries {
                let Some(part) = e.part() else { continue };
                let expected = match &shape {
                    None => None,
                    Some((s, _)) if part.per_block() => Some((
                        vec![part.len(crate::state::shape_len(s).unwrap_or(0))],
                        None,
                    )),
                    Some((s, from)) => Some((s.clone(), Some(from.as_str()))),
                };
                let (data, found) = take(
                    e,
                    i,
                    expected.as_ref().map(|(s, from)| (s.as_slice(), *from)),
                )?;
                if shape.is_none() {
                    shape = Some((found, e.name(i)));
                }
                part.store(&mut state, data)?;
            }
            // The scalar is what PyTorch reads; it must agree with the exact count:
            // the metadata's for this tensor, else the optimizer's, else (a PyTorch file
            // whose tensors took different numbers of steps) the scalar itself when it
            // is a whole number that f32 holds exactly.
            let s = match take(Entry::Step, i, Some((&[], None)))?.0 {
                Data::F32(v) => v.first().copied().unwrap_or(f32::NAN),
                Data::U8(_) => f32::NAN,
            };
            let key = format!("tensor.{i}.step");
            let tensor_step = if meta.contains_key(&key) {
                count(&key)?
            } else if s == step as f32 {
                step
            } else if s.fract() == 0.0 && (0.0..=16_777_216.0).contains(&s) {
                s as u64
            } else {
                return Err(refuse(format!(
                    "`{}` is {s} but the metadata says step {step}",
                    Entry::Step.name(i)
                )));
            };
            if s != tensor_step as f32 {
                return Err(refuse(format!(
                    "`{}` is {s} but tensor {i} took {tensor_step} steps",
                    Entry::Step.name(i)
                )));
            }
            state.step = tensor_step;
            tensors.push(state);
            shapes.push(shape.map(|(s, _)| s).unwrap_or_default());
        }
        let names = (0..n_tensors)
            .map(|i| optional(&format!("tensor.{i}.name")).map(str::to_owned))
            .collect();
        // (In this crate's files every key is checked against what its writer writes,
        // below; PyTorch's carry no checksum, so a name for a tensor they do not hold
        // is refused here.)
        if let Some(k) = meta
            .keys()
            .find(|k| torch_name_index(k).is_some_and(|i| i >= n_tensors))
        {
            return Err(refuse(format!(
                "metadata `{k}` names a tensor the file does not hold ({n_tensors} tensors)"
            )));
        }
        let mut hypers = vec![TensorHyper::from_config(&config); n_tensors];
        for (i, h) in hypers.iter_mut().enumerate() {
            let (scale, wd) = (
                format!("tensor.{i}.lr_scale"),
                format!("tensor.{i}.weight_decay"),
            );
            if meta.contains_key(&scale) || meta.contains_key(&wd) {
                *h = TensorHyper {
                    lr_scale: num(&scale)?,
                    weight_decay: num(&wd)?,
                };
            }
        }
        // An f32 setting, refused as the file writes it when f32 cannot hold it (1e-50
        // would read as 0, 1e39 as infinity, and be reported so).
        let number = |k: &str| -> Result<Option<f32>> {
            optional(k)
                .map(|v| {
                    let x = v
                        .parse::<f64>()
                        .map_err(|_| refuse(format!("metadata `{k}` is not a number")))?;
                    let f = x as f32;
                    if x.is_finite() && (f.is_infinite() || (f == 0.0 && x != 0.0)) {
                        return Err(refuse(format!(
                            "metadata `{k}` is {v}, beyond what an f32 setting holds"
                        )));
                    }
                    Ok(f)
                })
                .transpose()
        };
        let options = StepOptions {
            inv_scale: number("options.inv_scale")?,
            max_norm: number("options.max_norm")?,
            skip_nonfinite: match optional("options.skip_nonfinite") {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => return Err(refuse(format!("options.skip_nonfinite is `{other}`"))),
            },
        };
        let scaler = match number("scaler.scale")? {
            None => None,
            Some(scale) => {
                let whole = |k: &str| -> Result<u32> {
                    u32::try_from(count(k)?)
                        .map_err(|_| refuse(format!("metadata `{k}` is beyond u32")))
                };
                Some(LossScaler {
                    scale,
                    // Written since the floor exists; files from before it had none.
                    min_scale: number("scaler.min_scale")?.unwrap_or(LossScaler::NO_FLOOR),
                    growth_factor: num("scaler.growth_factor")?,
                    backoff_factor: num("scaler.backoff_factor")?,
                    growth_interval: whole("scaler.growth_interval")?,
                    growth_tracker: whole("scaler.growth_tracker")?,
                })
            }
        };
        let mut ck = Self {
            config,
            step,
            storage,
            tensors,
            shapes,
            names,
            state_formats: formats,
            hypers,
            options,
            scaler,
        };
        if format_2 {
            legacy::upgrade(&mut ck)?;
        }
        ck.validate_any(allow_empty)?;
        if ours {
            check_keys(&meta, &ck, format)?;
        }
        Ok(ck)
    }
}

/// The metadata keys of PyTorch's files (scripts/torch_checkpoint.py writes them).
const TORCH_KEYS: [&str; 13] = [
    "format",
    "storage",
    "step",
    "tensors",
    "lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "eps_mode",
    "weight_decay_mode",
    "maximize",
    "made_by",
];

/// Refuses, before anything else is read, a key that PyTorch does not write in a file
/// that says it is PyTorch's: such a file carries no checksum, and deleting one must
/// not let this crate's keys in unchecked.
fn check_torch_keys(meta: &HashMap<String, String>) -> Result<()> {
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    match keys
        .iter()
        .find(|k| !TORCH_KEYS.contains(&k.as_str()) && torch_name_index(k).is_none())
    {
        Some(k) => Err(refuse(format!(
            "metadata key `{k}` is not one PyTorch writes; a file in format {TORCH_FORMAT} (no checksum) carries only {} and `tensor.{{i}}.name` (its group's `param_names`)",
            TORCH_KEYS.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `i` of a key `tensor.{i}.name` (a parameter's name, from PyTorch's `param_names`),
/// written as this crate writes an index.
fn torch_name_index(key: &str) -> Option<usize> {
    let i = key.strip_prefix("tensor.")?.strip_suffix(".name")?;
    i.parse::<usize>().ok().filter(|n| n.to_string() == i)
}

/// Refuses metadata keys this crate's writer does not write for `ck` (besides the
/// checksum; a key written since, like `scaler.min_scale`, may be absent), and values
/// not as it writes them (`+5` for `5`): an unknown key or a rewritten value is an edited
/// file or another program's, not state to guess at.
fn check_keys(meta: &HashMap<String, String>, ck: &Checkpoint, format: &str) -> Result<()> {
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    let mut written = ck.metadata();
    // (A file of an older format was written with its own.)
    written.insert("format".into(), format.to_owned());
    for k in keys
        .into_iter()
        .filter(|k| k.as_str() != file::CHECKSUM_KEY)
    {
        match written.get(k.as_str()) {
            None => {
                return Err(refuse(format!(
                    "metadata key `{k}` is not one this checkpoint's writer writes ({}); the file was edited or made by another program",
                    unknown_key_hint(k)
                )))
            }
            Some(w) if *w != meta[k] => {
                return Err(refuse(format!(
                    "metadata `{k}` is `{}`, not as this crate writes that value (`{w}`); the file was edited or made by another program",
                    meta[k]
                )))
            }
            Some(_) => {}
        }
    }
    // The one key whose absence has a meaning of its own (the tensor took the
    // optimizer's step count): the writer writes it whenever the counts differ.
    if let Some(k) = written
        .keys()
        .find(|k| k.starts_with("tensor.") && k.ends_with(".step") && !meta.contains_key(*k))
    {
        return Err(refuse(format!(
            "metadata key `{k}` is missing although that tensor's step count differs from the optimizer's, which this crate's writer always records; the file was edited or made by another program"
        )));
    }
    Ok(())
}

/// Why a key of this crate's vocabulary can still be out of place.
fn unknown_key_hint(k: &str) -> &'static str {
    match k {
        "seed" => "a seed is written only for a mode that rounds stochastically",
        "state_block" => "`state_block` comes only with `state_format: blockwise8`",
        "min_8bit_len" => "`min_8bit_len` comes with `state_format: blockwise8`, and with f32 state only when not the default, 4096",
        "param_mode" | "state_format" => "the default modes are written by leaving the key out",
        k if k.starts_with("tensor.") => {
            "per-tensor keys name tensors the file holds, and `tensor.{i}.step` only a count that differs from `step`"
        }
        k if k.starts_with("options.") || k.starts_with("scaler.") => {
            "an option is written only when set, scaler keys only with a scaler"
        }
        _ => "no such key",
    }
}
