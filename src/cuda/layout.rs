//! Where each tensor lives: its offset in the optimizer's state buffers, its first
//! reduction chunk, and its first work unit of the update ([`StateLayout`]); and where
//! it lies in a caller's flat buffer ([`FlatLayout`]). Pure computations, checked
//! before anything is allocated.

use crate::{
    config::StateFormat,
    error::{Error, Result},
    shard::Placement,
    spec::lowbit::QBLOCK,
    state::parts::Part,
};

use super::args::CHUNK;

/// Elements between the starts of two tensors' state: offsets stay 256-byte aligned
/// (what cudaMalloc guarantees), so the kernel's 16-byte vector path always applies to
/// the optimizer's own buffers.
const STATE_ALIGN: usize = 64;
/// The smallest work unit of the update, in elements (a multiple of 8, so that every
/// unit of every storage type starts on a 16-byte boundary).
const MIN_UNIT: u64 = 1024;
// Units are whole blocks of 8-bit state (one warp each in the kernel).
const _: () = assert!(
    MIN_UNIT.is_multiple_of(8)
        && MIN_UNIT.is_multiple_of(QBLOCK as u64)
        && CHUNK.is_multiple_of(MIN_UNIT)
);

/// Where each tensor lives in the state buffers and in the launch's chunks. Each part
/// of the state has one buffer holding the tensors that keep that part, and only
/// those: the master weights every tensor (of a mode with masters), the f32 moments the
/// tensors in f32 state, the 8-bit codes and scales those in 8 bits (see
/// [`Precision::min_8bit_len`](crate::Precision::min_8bit_len)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StateLayout {
    pub(super) lens: Vec<usize>,
    /// Each tensor's state format.
    pub(super) formats: Vec<StateFormat>,
    /// Element offset of each tensor in the master buffer.
    pub(super) offsets: Vec<usize>,
    /// Element offset of each tensor in f32 state in the f32 moment buffers (an 8-bit
    /// tensor's is where the next one would start, and unused).
    pub(super) moment_offsets: Vec<usize>,
    /// Element offset of each 8-bit tensor in the code buffers (likewise).
    pub(super) code_offsets: Vec<usize>,
    /// Index of each 8-bit tensor's first block in the scale buffers (likewise).
    pub(super) block_begin: Vec<usize>,
    /// Index of each tensor's first reduction chunk in a launch.
    pub(super) chunk_begin: Vec<u64>,
    pub(super) num_chunks: u64,
    /// Where each tensor sits in the whole list it is a piece of, and that list's
    /// chunks (the partial sums finalize adds); whole tensors unless set for a shard.
    pub(super) placements: Vec<Placement>,
    pub(super) num_partials: u64,
    /// Elements per work unit of the update, and each tensor's first unit.
    pub(super) unit_len: u64,
    pub(super) unit_begin: Vec<u64>,
    pub(super) num_units: u64,
    /// Values of each buffer: masters, f32 moments, codes, scales (each at least 1:
    /// the driver refuses empty buffers).
    pub(super) total: usize,
    pub(super) total_moments: usize,
    pub(super) total_codes: usize,
    pub(super) total_blocks: usize,
}

/// Offsets of the tensors of `lens` that `holds` in one buffer, each starting at a
/// multiple of [`STATE_ALIGN`] values (a tensor that does not hold it gets the offset
/// where the next would start, and no values), and the buffer's length (at least 1);
/// `None` when its byte size at 4 bytes a value does not fit.
fn pack(lens: &[usize], holds: impl Fn(usize) -> bool) -> Option<(Vec<usize>, usize)> {
    let mut offsets = Vec::with_capacity(lens.len());
    let mut total = 0usize;
    for (i, &n) in lens.iter().enumerate() {
        offsets.push(total);
        if holds(i) {
            total = n
                .checked_next_multiple_of(STATE_ALIGN)
                .and_then(|padded| total.checked_add(padded))
                .filter(|t| t.checked_mul(4).is_some())?;
        }
    }
    Some((offsets, total.max(1)))
}

impl StateLayout {
    /// The layout of tensors of `lens` kept in `formats`; refuses sizes whose sum or
    /// byte size does not fit (nothing is allocated before this succeeds).
    pub(crate) fn new(lens: Vec<usize>, formats: Vec<StateFormat>) -> Result<Self> {
        let too_large = || Error::TooLarge {
            what: "the total element count of the parameter list",
        };
        if formats.len() != lens.len() {
            return Err(Error::Internal {
                what: "a state layout with one format per tensor expected",
            });
        }
        let q8 = |i: usize| formats[i] == StateFormat::Blockwise8;
        let (offsets, total) = pack(&lens, |_| true).ok_or_else(too_large)?;
        let (moment_offsets, total_moments) = pack(&lens, |i| !q8(i)).ok_or_else(too_large)?;
        let (code_offsets, total_codes) = pack(&lens, q8).ok_or_else(too_large)?;
        let mut chunk_begin = Vec::with_capacity(lens.len());
        let mut block_begin = Vec::with_capacity(lens.len());
        let (mut chunks, mut blocks, mut most_units) = (0u64, 0usize, 0u64);
        for (i, &n) in lens.iter().enumerate() {
            chunk_begin.push(chunks);
            block_begin.push(blocks);
            if q8(i) {
                // Never overflows: fewer blocks than elements, whose sum is checked.
                blocks += n.div_ceil(QBLOCK);
            }
            chunks = chunks
                .checked_add((n as u64).div_ceil(CHUNK))
                .ok_or_else(too_large)?;
            // Never overflows either: fewer units than elements.
            most_units += (n as u64).div_ceil(MIN_UNIT);
        }
        // The update's unit index is 32-bit (kernels/adamax.cu, adamax_step): the most
        // units any plan makes (plan_units, at MIN_UNIT) stay under 2^31, so that a
        // grid-stride step (a grid of at most 2^31 - 1 blocks) never wraps it.
        if most_units >= 1 << 31 {
            return Err(Error::TooLarge {
                what:
                    "the parameter list's count of update work units (under 2^31 of 1,024 elements)",
            });
        }
        let (placements, partials) = Placement::whole(&lens);
        let mut layout = Self {
            placements,
            num_partials: partials as u64,
            lens,
            formats,
            offsets,
            moment_offsets,
            code_offsets,
            block_begin,
            chunk_begin,
            num_chunks: chunks,
            unit_len: CHUNK,
            unit_begin: Vec::new(),
            num_units: 0,
            total,
            total_moments,
            total_codes,
            total_blocks: blocks.max(1),
        };
        layout.plan_units(1);
        Ok(layout)
    }

    /// Where tensor `tensor`'s values of `part` start in the part's buffer.
    pub(crate) fn offset(&self, part: Part, tensor: usize) -> usize {
        match part {
            Part::Master => self.offsets[tensor],
            Part::ExpAvg | Part::ExpInf => self.moment_offsets[tensor],
            Part::ExpAvgCodes | Part::ExpInfCodes => self.code_offsets[tensor],
            Part::ExpAvgScales | Part::ExpInfScales => self.block_begin[tensor],
        }
    }

    /// Values of `part`'s buffer.
    pub(crate) fn buffer_len(&self, part: Part) -> usize {
        match part {
            Part::Master => self.total,
            Part::ExpAvg | Part::ExpInf => self.total_moments,
            Part::ExpAvgCodes | Part::ExpInfCodes => self.total_codes,
            Part::ExpAvgScales | Part::ExpInfScales => self.total_blocks,
        }
    }

    pub(crate) fn formats(&self) -> &[StateFormat] {
        &self.formats
    }

    /// This layout for one rank's pieces of a sharded list: each tensor (a piece) at
    /// `placements` (one per tensor) in a whole list of `num_partials` chunks.
    #[cfg(feature = "nccl")]
    pub(crate) fn placed(
        mut self,
        placements: Vec<Placement>,
        num_partials: usize,
    ) -> Result<Self> {
        if placements.len() != self.lens.len() {
            return Err(Error::Internal {
                what: "a shard's state layout with one placement per piece expected",
            });
        }
        self.placements = placements;
        self.num_partials = num_partials as u64;
        Ok(self)
    }

    pub(crate) fn placements(&self) -> &[Placement] {
        &self.placements
    }

    pub(crate) fn num_partials(&self) -> u64 {
        self.num_partials
    }

    /// Cuts the tensors into work units of the update for a device whose whole wave of
    /// the update kernel is `wave` blocks.
    ///
    /// NOTE: [unit size] The unit is the largest power of two in `[1024, CHUNK]` that
    /// still gives about a wave of units, so a small step spreads over every
    /// multiprocessor (the first H100 run: a 2^16 step took 11.2 us in 8 chunk-sized
    /// blocks and 5.0 us in 1,024-element units), while a large one keeps long units
    /// whose per-unit cost (finding the tensor, its scalars) is spread over 8,192
    /// elements. The reduction keeps its own fixed chunks: its summation order is
    /// specified over them.
    pub(crate) fn plan_units(&mut self, wave: u32) {
        let total: u64 = self.lens.iter().map(|&n| n as u64).sum();
        let per_block = total / u64::from(wave.max(1));
        let unit = if per_block == 0 {
            MIN_UNIT
        } else {
            (1u64 << per_block.ilog2()).clamp(MIN_UNIT, CHUNK)
        };
        // A power of two dividing CHUNK: a unit never crosses a multiple of 2^32 elements
        // (the kernel takes the high part of the stream's index once per unit).
        debug_assert!(unit.is_power_of_two() && CHUNK.is_multiple_of(unit));
        self.unit_len = unit;
        self.unit_begin.clear();
        let mut units = 0u64;
        for &n in &self.lens {
            self.unit_begin.push(units);
            units += (n as u64).div_ceil(unit);
        }
        self.num_units = units;
    }

    pub(crate) fn unit_len(&self) -> u64 {
        self.unit_len
    }

    pub(crate) fn num_units(&self) -> u64 {
        self.num_units
    }

    pub(crate) fn lens(&self) -> &[usize] {
        &self.lens
    }

    pub(crate) fn num_chunks(&self) -> u64 {
        self.num_chunks
    }
}

/// Where each tensor lies in a flat buffer: element offsets and lengths, in tensor
/// order, without overlaps. The gradient buffer has the same layout.
///
/// ```
/// use adamax_cuda::cuda::FlatLayout;
/// let l = FlatLayout::aligned(&[768, 3, 50_257])?;
/// assert_eq!(l.offsets(), &[0, 768, 832]);
/// assert_eq!(l.total(), 832 + 50_257);
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLayout {
    offsets: Vec<usize>,
    lens: Vec<usize>,
    total: usize,
}

/// Elements each tensor of [`FlatLayout::aligned`] starts at a multiple of: 256 bytes
/// for f32, so every tensor takes the kernel's 16-byte vector path.
pub const FLAT_ALIGN: usize = 64;

impl FlatLayout {
    /// Tensors back to back. A tensor whose offset is not a multiple of 4 (f32) or 8
    /// (16-bit) elements takes the kernel's element-by-element path: prefer
    /// [`FlatLayout::aligned`] when the buffer is yours to lay out.
    pub fn packed(lens: &[usize]) -> Result<Self> {
        Self::with_alignment(lens, 1)
    }

    /// Each tensor starting at a multiple of [`FLAT_ALIGN`] elements.
    pub fn aligned(lens: &[usize]) -> Result<Self> {
        Self::with_alignment(lens, FLAT_ALIGN)
    }

    fn with_alignment(lens: &[usize], align: usize) -> Result<Self> {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &n in lens {
            let start = at.checked_next_multiple_of(align).ok_or_else(too_large)?;
            offsets.push(start);
            at = start.checked_add(n).ok_or_else(too_large)?;
        }
        Self::new(offsets, lens.to_vec())
    }

    /// A layout of your own: `offsets[i]` is where tensor `i` of `lens[i]` elements
    /// starts. Tensors may come in any order and with gaps between them, but no two
    /// share an element; an empty tensor shares none, so it may sit anywhere in the
    /// buffer (also where another tensor is). Refused, each with
    /// [`Error::InvalidLayout`]: lists of different lengths, an empty list, overlapping
    /// tensors, and a buffer too large to address (its end, in bytes of f32, beyond
    /// `isize::MAX`).
    pub fn new(offsets: Vec<usize>, lens: Vec<usize>) -> Result<Self> {
        if offsets.len() != lens.len() {
            return Err(invalid(format!(
                "{} offsets for {} lengths; give one offset per tensor",
                offsets.len(),
                lens.len()
            )));
        }
        if lens.is_empty() {
            return Err(invalid("it has no tensors; give at least one".into()));
        }
        let mut total = 0usize;
        for (i, (&o, &n)) in offsets.iter().zip(&lens).enumerate() {
            let end = o
                .checked_add(n)
                .filter(|e| e.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
                .ok_or_else(|| {
                    invalid(format!(
                        "tensor {i} ({n} elements at offset {o}) ends beyond what a buffer can hold"
                    ))
                })?;
            total = total.max(end);
        }
        // Non-empty tensors by offset: each must end before the next one starts.
        let mut order: Vec<usize> = (0..lens.len()).filter(|&i| lens[i] > 0).collect();
        order.sort_unstable_by_key(|&i| offsets[i]);
        for w in order.windows(2) {
            let (a, b) = (w[0], w[1]);
            if offsets[a] + lens[a] > offsets[b] {
                let range = |i: usize| format!("{}..{}", offsets[i], offsets[i] + lens[i]);
                return Err(invalid(format!(
                    "tensors {a} (elements {}) and {b} (elements {}) overlap; give every tensor its own elements",
                    range(a),
                    range(b)
                )));
            }
        }
        Ok(Self {
            offsets,
            lens,
            total,
        })
    }

    /// Element offset of every tensor.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Elements of every tensor.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Elements a buffer of this layout needs: the largest end of a tensor (an empty
    /// tensor's end is its offset).
    pub fn total(&self) -> usize {
        self.total
    }
}

fn too_large() -> Error {
    invalid("its tensors end beyond what a buffer can hold".into())
}

fn invalid(reason: String) -> Error {
    Error::InvalidLayout { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_pack_or_align_and_refuse_what_cannot_be_a_buffer() {
        let p = FlatLayout::packed(&[3, 0, 5]).unwrap();
        assert_eq!((p.offsets(), p.total()), (&[0, 3, 3][..], 8));
        let a = FlatLayout::aligned(&[3, 0, 5]).unwrap();
        assert_eq!((a.offsets(), a.total()), (&[0, 64, 64][..], 69));
        let refused = |offsets: Vec<usize>, lens: Vec<usize>, says: &str| match FlatLayout::new(
            offsets.clone(),
            lens.clone(),
        ) {
            Err(e @ Error::InvalidLayout { .. }) => {
                assert!(e.to_string().contains(says), "{offsets:?} {lens:?}: {e}")
            }
            other => panic!("{offsets:?} {lens:?}: {other:?}"),
        };
        refused(
            vec![0, 2],
            vec![3, 1],
            "tensors 0 (elements 0..3) and 1 (elements 2..3) overlap",
        );
        refused(
            vec![5, 0],
            vec![1, 6],
            "tensors 1 (elements 0..6) and 0 (elements 5..6) overlap",
        );
        refused(vec![0], vec![1, 1], "1 offsets for 2 lengths");
        refused(vec![], vec![], "no tensors");
        refused(vec![usize::MAX], vec![2], "beyond what a buffer can hold");
        // An empty tensor far out used to give total() == usize::MAX.
        refused(vec![usize::MAX], vec![0], "beyond what a buffer can hold");
        refused(vec![0, isize::MAX as usize / 4 + 1], vec![1, 0], "tensor 1");
        assert!(matches!(
            FlatLayout::aligned(&[usize::MAX - 3, 1]),
            Err(Error::InvalidLayout { .. })
        ));
        // Gaps are fine (padding), and a tensor may start where the last ended.
        let own = FlatLayout::new(vec![10, 20, 25], vec![10, 5, 0]).unwrap();
        assert_eq!(own.total(), 25);
        // Any order; an empty tensor may sit anywhere, even inside another (it used to be
        // refused as "out of order" with the text of a buffer-length mismatch).
        let any = FlatLayout::new(vec![10, 0, 3], vec![0, 5, 0]).unwrap();
        assert_eq!(any.total(), 10);
        let shuffled = FlatLayout::new(vec![8, 0, 4], vec![2, 4, 4]).unwrap();
        assert_eq!(shuffled.total(), 10);
    }

    fn formats(q8: &[bool]) -> Vec<StateFormat> {
        q8.iter()
            .map(|&q| {
                if q {
                    StateFormat::Blockwise8
                } else {
                    StateFormat::F32
                }
            })
            .collect()
    }

    #[test]
    fn the_layout_aligns_every_tensor_and_counts_chunks() {
        let lens = vec![0, 1, 64, 65, 8193];
        let l = StateLayout::new(lens.clone(), formats(&[true; 5])).unwrap();
        assert_eq!(l.offsets, [0, 0, 64, 128, 256]);
        assert_eq!(l.code_offsets, l.offsets);
        assert_eq!(l.block_begin, [0, 0, 1, 2, 3]);
        assert_eq!(l.total_blocks, 3 + 33);
        assert_eq!(l.chunk_begin, [0, 0, 1, 2, 3]);
        assert_eq!(l.num_chunks, 5);
        assert_eq!(l.total, 256 + 8256);
        assert_eq!((l.total_codes, l.total_moments), (l.total, 1));
        let f32_state = StateLayout::new(lens, formats(&[false; 5])).unwrap();
        assert_eq!(f32_state.moment_offsets, l.offsets);
        assert_eq!((f32_state.total_codes, f32_state.total_blocks), (1, 1));
        let one = StateLayout::new(vec![0], formats(&[false])).unwrap();
        assert_eq!(one.total, 1);
    }

    #[test]
    fn each_buffer_holds_only_the_tensors_of_its_format() {
        // A bias in f32 state between two 8-bit matrices, and an f32-state embedding.
        let l = StateLayout::new(
            vec![4096, 768, 65, 5000],
            formats(&[true, false, true, false]),
        )
        .unwrap();
        assert_eq!(l.offsets, [0, 4096, 4864, 4992]);
        assert_eq!(l.code_offsets, [0, 4096, 4096, 4224]);
        assert_eq!(l.total_codes, 4096 + 128);
        assert_eq!(l.block_begin, [0, 16, 16, 17]);
        assert_eq!(l.total_blocks, 17);
        assert_eq!(l.moment_offsets, [0, 0, 768, 768]);
        assert_eq!(l.total_moments, 768 + 5056);
        assert_eq!(l.offset(Part::ExpInfScales, 2), 16);
        assert_eq!(l.offset(Part::ExpInf, 3), 768);
        assert_eq!(l.buffer_len(Part::ExpAvgCodes), 4224);
        assert!(matches!(
            StateLayout::new(vec![1, 2], formats(&[true])),
            Err(Error::Internal { .. })
        ));
    }

    #[test]
    fn units_shrink_to_spread_small_steps_over_a_wave_and_stay_whole_for_large_ones() {
        let wave = 132 * 6;
        let f = |n: usize| vec![StateFormat::F32; n];
        let mut l = StateLayout::new(vec![1 << 16], f(1)).unwrap();
        l.plan_units(wave);
        assert_eq!((l.unit_len, l.num_units), (1024, 64));
        let mut l = StateLayout::new(vec![1 << 28], f(1)).unwrap();
        l.plan_units(wave);
        assert_eq!((l.unit_len, l.num_units), (8192, 1 << 15));
        let mut l = StateLayout::new(vec![4096, 0, 5, 1 << 20], f(4)).unwrap();
        l.plan_units(wave);
        assert_eq!(l.unit_len, 1024);
        assert_eq!(l.unit_begin, [0, 4, 4, 5]);
        assert_eq!(l.num_units, 5 + 1024);
        let mut l = StateLayout::new(vec![0, 0], f(2)).unwrap();
        l.plan_units(wave);
        assert_eq!(l.num_units, 0);
    }

    #[test]
    fn the_most_units_the_kernels_32_bit_index_takes_are_accepted() {
        let lens = vec![(1 << 41) - MIN_UNIT as usize];
        let mut l = StateLayout::new(lens, vec![StateFormat::F32]).unwrap();
        l.plan_units(u32::MAX);
        assert_eq!(l.num_units, (1 << 31) - 1);
    }

    #[test]
    fn sizes_that_overflow_are_refused_before_anything_is_allocated() {
        for lens in [
            vec![usize::MAX],
            vec![usize::MAX / 2, usize::MAX / 2],
            vec![usize::MAX / 4 + 1],
            vec![1 << 62, 1 << 62, 1 << 62],
            // 2^31 units of MIN_UNIT: the update's unit index is 32-bit.
            vec![1 << 41],
            vec![1 << 40, 1 << 40],
            vec![(1 << 41) - MIN_UNIT as usize, 1],
        ] {
            for format in [StateFormat::F32, StateFormat::Blockwise8] {
                assert!(
                    matches!(
                        StateLayout::new(lens.clone(), vec![format; lens.len()]),
                        Err(Error::TooLarge { .. })
                    ),
                    "{lens:?}"
                );
            }
        }
    }
}
