//! Sharding the optimizer state over ranks (ZeRO-1, issue #20): where each rank's shard
//! of the flat parameter and gradient buffers lies, and which pieces of which tensors it
//! steps. Pure arithmetic, shared by every path that shards (the ranks simulated on the
//! CPU in the tests, and the GPUs), so that the simulation checks the code the GPUs
//! run.
//!
//! # Why the shards are cut where they are
//!
//! A sharded step must give the bits one optimizer over the whole list gives, at any
//! world size. Three things tie elements together in a step, and a shard boundary
//! must not cut any of them:
//!
//! - the reduction behind clipping and the overflow check sums each chunk of
//!   [`CHUNK`] elements (counted from its tensor's start) in a fixed order
//!   ([`crate::fused`]), so a chunk must lie on one rank;
//! - 8-bit state scales each block of [`QBLOCK`] elements (from the tensor's start,
//!   a divisor of [`CHUNK`]) by its largest value;
//! - the random stream draws by (tensor, element), which a piece keeps by carrying its
//!   tensor's index and its first element.
//!
//! So a shard boundary falls where a tensor starts, or at a multiple of [`CHUNK`]
//! elements into one. The layout places the tensors in order, each at the next multiple
//! of [`SHARD_ALIGN`] elements (Megatron's 64, for vector loads), except one that a
//! boundary would cut there, which moves to the next multiple of [`CHUNK`] (the
//! boundaries are multiples of it). The shards are equal (NCCL's reduce-scatter and
//! all-gather move equal counts): the least multiple of [`CHUNK`], at least one, for
//! which the tensors so placed fit. So the padding is at most `SHARD_ALIGN - 1` elements
//! before each tensor, or `CHUNK - 1` before a moved one, and whatever rounds the end
//! up to equal shards (a list of many tiny tensors is mostly padding: pack them into
//! one). The flat buffers hold at most `isize::MAX / 4` elements (their f32 bytes
//! must be addressable).

use crate::{
    config::AdamaxConfig,
    error::{Error, Result},
    fused::CHUNK,
    spec::lowbit::QBLOCK,
    state::Schedule,
};

/// The most ranks a [`ShardLayout`] has: 2^20, about ten times the largest GPU jobs
/// run, so that every per-rank list a layout implies (a checkpoint split over all its
/// ranks, a gather of their shards) stays allocatable (NCCL itself counts up to
/// 2^31 - 1).
pub const MAX_WORLD_SIZE: usize = 1 << 20;

/// Elements each tensor of a [`ShardLayout`] starts at a multiple of (256 bytes of f32,
/// as [`crate::cuda::FlatLayout::aligned`]), unless a shard boundary cuts it.
pub const SHARD_ALIGN: usize = 64;

// A boundary at a multiple of CHUNK cuts no 8-bit block, and vector accesses stay
// aligned.
const _: () = assert!(CHUNK.is_multiple_of(QBLOCK) && CHUNK.is_multiple_of(SHARD_ALIGN));

/// Where a tensor of an optimizer sits in the whole list of tensors it is a piece of,
/// when the optimizer steps one rank's shard (this module); for an optimizer over
/// whole tensors, tensor `i` is `{ tensor: i, element: 0, chunk: its first chunk }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The whole tensor's index: the random stream's key.
    pub tensor: usize,
    /// The piece's first element in its tensor: the random stream's first element (a
    /// multiple of [`CHUNK`] for a piece of a cut tensor).
    pub element: usize,
    /// The piece's first chunk in the whole list's reduction order.
    pub chunk: usize,
}

impl Placement {
    /// Whole tensors of `lens`, as one optimizer over all of them places them, and the
    /// chunks of the list.
    pub(crate) fn whole(lens: &[usize]) -> (Vec<Placement>, usize) {
        let mut chunks = 0usize;
        let placements = lens
            .iter()
            .enumerate()
            .map(|(tensor, &n)| {
                let p = Placement {
                    tensor,
                    element: 0,
                    chunk: chunks,
                };
                chunks += n.div_ceil(CHUNK);
                p
            })
            .collect();
        (placements, chunks)
    }
}

/// Elements `begin..end` of tensor `tensor`: what one rank steps of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index of the tensor in the whole list.
    pub tensor: usize,
    /// First element, counted from the tensor's start (a multiple of [`CHUNK`]).
    pub begin: usize,
    /// One past the last element.
    pub end: usize,
}

impl Piece {
    /// Elements of the piece.
    pub fn len(&self) -> usize {
        self.end - self.begin
    }

    /// Whether the piece holds no element (an empty tensor's).
    pub fn is_empty(&self) -> bool {
        self.begin == self.end
    }
}

/// The flat buffers of a sharded run: each tensor's offset, and the `world_size` equal
/// shards, one per rank, that the flat buffer is cut into.
///
/// ```
/// use adamax_cuda::shard::ShardLayout;
/// // GPT-2 small's first tensors: the embedding is cut at multiples of 8,192 elements.
/// let layout = ShardLayout::new(&[50_257 * 768, 1024 * 768, 768], 4)?;
/// assert_eq!(layout.shard_len() % 8192, 0);
/// assert_eq!(layout.total(), 4 * layout.shard_len());
/// let first = layout.pieces(0);
/// assert_eq!((first[0].tensor, first[0].begin), (0, 0));
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    lens: Vec<usize>,
    offsets: Vec<usize>,
    world_size: usize,
    shard_len: usize,
}

impl ShardLayout {
    /// The layout of tensors of `lens` over `world_size` ranks (the section above says
    /// where it cuts). Refused ([`Error::InvalidLayout`]): no tensors, no ranks or more
    /// than [`MAX_WORLD_SIZE`], and sizes whose padded total does not fit a buffer.
    pub fn new(lens: &[usize], world_size: usize) -> Result<Self> {
        if lens.is_empty() {
            return Err(invalid("it has no tensors; give at least one".into()));
        }
        if world_size == 0 || world_size > MAX_WORLD_SIZE {
            return Err(invalid(format!(
                "its world size is {world_size}; give 1 to {MAX_WORLD_SIZE} ranks (shard::MAX_WORLD_SIZE)"
            )));
        }
        let too_large = || invalid("its tensors, padded, end beyond what a buffer can hold".into());
        // The least shard that holds everything packed, then one CHUNK more per try
        // while the padding of cut tensors pushes the end past the last shard.
        let mut packed = 0usize;
        for &n in lens {
            packed = packed
                .checked_next_multiple_of(SHARD_ALIGN)
                .and_then(|a| a.checked_add(n))
                .ok_or_else(too_large)?;
        }
        let mut shard_len = packed
            .div_ceil(world_size)
            .checked_next_multiple_of(CHUNK)
            .ok_or_else(too_large)?
            .max(CHUNK);
        loop {
            let total = shard_len.checked_mul(world_size).ok_or_else(too_large)?;
            if total.checked_mul(4).is_none_or(|b| b > isize::MAX as usize) {
                return Err(too_large());
            }
            if let Some(offsets) = place(lens, shard_len, total) {
                return Ok(Self {
                    lens: lens.to_vec(),
                    offsets,
                    world_size,
                    shard_len,
                });
            }
            shard_len = shard_len.checked_add(CHUNK).ok_or_else(too_large)?;
        }
    }

    /// Ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Elements of each rank's shard (a multiple of [`CHUNK`]).
    pub fn shard_len(&self) -> usize {
        self.shard_len
    }

    /// Elements of the flat buffers: `world_size * shard_len`.
    pub fn total(&self) -> usize {
        self.world_size * self.shard_len
    }

    /// Each tensor's element offset in the flat buffers.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Each tensor's elements.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Rank `rank`'s shard of the flat buffers, as element offsets; the empty range at
    /// [`ShardLayout::total`] for `rank >= world_size`.
    pub fn shard(&self, rank: usize) -> std::ops::Range<usize> {
        if rank >= self.world_size {
            return self.total()..self.total();
        }
        rank * self.shard_len..(rank + 1) * self.shard_len
    }

    /// The pieces of tensors that rank `rank` steps, in tensor order: every non-empty
    /// intersection of a tensor with its shard. An empty tensor belongs to the rank
    /// whose shard holds its offset (the last rank's, past the end). Empty for a rank
    /// of no tensor's and for `rank >= world_size`.
    pub fn pieces(&self, rank: usize) -> Vec<Piece> {
        if rank >= self.world_size {
            return Vec::new();
        }
        let shard = self.shard(rank);
        let last = rank + 1 == self.world_size;
        let mut pieces = Vec::new();
        for (tensor, (&o, &n)) in self.offsets.iter().zip(&self.lens).enumerate() {
            if n == 0 {
                if shard.contains(&o) || (last && o >= shard.end) {
                    pieces.push(Piece {
                        tensor,
                        begin: 0,
                        end: 0,
                    });
                }
                continue;
            }
            let (lo, hi) = (o.max(shard.start), (o + n).min(shard.end));
            if lo < hi {
                pieces.push(Piece {
                    tensor,
                    begin: lo - o,
                    end: hi - o,
                });
            }
        }
        pieces
    }

    /// Where each piece of rank `rank` sits in the whole list: its tensor's index (the
    /// random stream's key), its first element, and its first chunk in the whole list's
    /// reduction order.
    pub(crate) fn placements(&self, rank: usize) -> Vec<Placement> {
        let mut first_chunk = Vec::with_capacity(self.lens.len());
        let mut chunks = 0usize;
        for &n in &self.lens {
            first_chunk.push(chunks);
            chunks += n.div_ceil(CHUNK);
        }
        self.pieces(rank)
            .iter()
            .map(|p| Placement {
                tensor: p.tensor,
                element: p.begin,
                chunk: first_chunk[p.tensor] + p.begin / CHUNK,
            })
            .collect()
    }

    /// Rank `rank`'s pieces and the schedule of an optimizer over them: each piece in
    /// its whole tensor's state format (`config`'s threshold applied to the whole
    /// tensor's length, so alike on every rank; an optimizer over them fixes its
    /// formats with `state::FIXED_BY_SHARD`).
    pub(crate) fn piece_schedule(
        &self,
        config: AdamaxConfig,
        rank: usize,
    ) -> Result<(Vec<Piece>, Schedule)> {
        let pieces = self.pieces(rank);
        let lens: Vec<usize> = pieces.iter().map(Piece::len).collect();
        let mut schedule = Schedule::new(config, &lens)?;
        for (i, p) in pieces.iter().enumerate() {
            let whole = config.precision.tensor_state(self.lens[p.tensor]);
            schedule.set_format(i, whole, None)?;
        }
        Ok((pieces, schedule))
    }

    /// Chunks of the whole list's reduction (as one optimizer over every tensor counts
    /// them).
    pub(crate) fn total_chunks(&self) -> usize {
        self.lens.iter().map(|n| n.div_ceil(CHUNK)).sum()
    }
}

/// Each tensor's offset with shards of `shard_len` and `total` elements in all, or
/// `None` when the padding of cut tensors does not fit.
fn place(lens: &[usize], shard_len: usize, total: usize) -> Option<Vec<usize>> {
    let mut offsets = Vec::with_capacity(lens.len());
    let mut at = 0usize;
    for &n in lens {
        let mut start = at.checked_next_multiple_of(SHARD_ALIGN)?;
        let cut = n > 0 && start / shard_len != (start + n - 1) / shard_len;
        if cut {
            start = start.checked_next_multiple_of(CHUNK)?;
        }
        offsets.push(start);
        at = start.checked_add(n)?;
    }
    (at <= total).then_some(offsets)
}

fn invalid(reason: String) -> Error {
    Error::InvalidLayout { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_equal_and_cut_tensors_only_at_chunk_multiples() {
        let lens = [50_257 * 768, 1024 * 768, 768, 0, 3, 8192 * 3 + 5, 100_000];
        for world in 1..=8 {
            let l = ShardLayout::new(&lens, world).unwrap();
            assert_eq!(l.total(), world * l.shard_len());
            assert!(l.shard_len().is_multiple_of(CHUNK));
            let mut seen = vec![0usize; lens.len()];
            for rank in 0..world {
                for p in l.pieces(rank) {
                    assert!(p.begin.is_multiple_of(CHUNK), "{world} {p:?}");
                    assert!(p.end <= lens[p.tensor]);
                    assert!(
                        l.shard(rank).contains(&(l.offsets()[p.tensor] + p.begin)) || p.is_empty()
                    );
                    seen[p.tensor] += p.len();
                }
            }
            assert_eq!(
                seen, lens,
                "world {world}: every element on exactly one rank"
            );
            for (i, (&o, &n)) in l.offsets().iter().zip(&lens).enumerate() {
                assert!(o.is_multiple_of(SHARD_ALIGN));
                if i > 0 {
                    assert!(o >= l.offsets()[i - 1] + lens[i - 1], "tensors overlap");
                }
                assert!(o + n <= l.total());
            }
            // Padding: at most a CHUNK per cut tensor, SHARD_ALIGN per tensor, and the
            // end's rounding to equal shards.
            let packed: usize = lens.iter().map(|n| n.next_multiple_of(SHARD_ALIGN)).sum();
            assert!(
                l.total() <= packed + world * CHUNK + lens.len() * CHUNK,
                "{world}"
            );
        }
    }

    #[test]
    fn one_rank_holds_every_tensor_whole() {
        let l = ShardLayout::new(&[5, 0, 70_000], 1).unwrap();
        assert_eq!(l.offsets(), &[0, 64, 64]);
        assert_eq!(
            l.pieces(0),
            [
                Piece {
                    tensor: 0,
                    begin: 0,
                    end: 5
                },
                Piece {
                    tensor: 1,
                    begin: 0,
                    end: 0
                },
                Piece {
                    tensor: 2,
                    begin: 0,
                    end: 70_000
                },
            ]
        );
        let p = l.placements(0);
        assert_eq!(
            p[2],
            Placement {
                tensor: 2,
                element: 0,
                chunk: 1
            }
        );
        assert_eq!(l.total_chunks(), 1 + 9);
    }

    #[test]
    fn a_tensor_cut_by_a_boundary_starts_on_a_chunk() {
        // Two ranks of 2 chunks would hold both packed, but the second tensor, at
        // 10,048, would cross the boundary at 16,384 at its element 6,336: it starts on a
        // chunk instead, and the shards grow by a chunk to hold it.
        let l = ShardLayout::new(&[10_000, 20_000], 2).unwrap();
        assert_eq!(
            (l.shard_len(), l.offsets()),
            (3 * CHUNK, &[0, 2 * CHUNK][..])
        );
        assert_eq!(
            l.pieces(1),
            [Piece {
                tensor: 1,
                begin: CHUNK,
                end: 20_000
            }]
        );
        let l = ShardLayout::new(&[10_000, 30_000], 2).unwrap();
        for rank in 0..2 {
            for p in l.pieces(rank) {
                assert!(p.begin.is_multiple_of(CHUNK));
            }
        }
        assert_eq!(l.pieces(1)[0].tensor, 1);
        assert_eq!(l.placements(1)[0].chunk, 2 + l.pieces(1)[0].begin / CHUNK);
    }

    #[test]
    fn layouts_that_cannot_be_are_refused() {
        for (lens, world) in [
            (vec![], 2),
            (vec![5], 0),
            (vec![5], MAX_WORLD_SIZE + 1),
            (vec![1], usize::MAX),
            (vec![usize::MAX], 1),
            (vec![usize::MAX / 8, usize::MAX / 8], 3),
        ] {
            assert!(
                matches!(
                    ShardLayout::new(&lens, world),
                    Err(Error::InvalidLayout { .. })
                ),
                "{lens:?} {world}"
            );
        }
        // Many ranks over one small tensor: the others hold nothing.
        let l = ShardLayout::new(&[10], 8).unwrap();
        assert_eq!(l.pieces(0).len(), 1);
        assert!((1..8).all(|r| l.pieces(r).is_empty()));
        assert!(l.pieces(8).is_empty());
        // A rank past the last has an empty shard at the end, also for usize::MAX (it
        // used to overflow).
        assert_eq!(l.shard(8), l.total()..l.total());
        assert_eq!(l.shard(usize::MAX), l.total()..l.total());
    }
}
