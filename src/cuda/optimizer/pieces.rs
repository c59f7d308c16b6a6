//! [`CudaAdamax`] over one rank's pieces of a sharded list ([`ShardLayout`]): what
//! [`crate::cuda::nccl::ShardedAdamax`] steps. The GPU twin of
//! [`CpuAdamax::for_shard`](crate::cpu::CpuAdamax::for_shard): each piece is placed in
//! the whole list (the random stream's tensor and first element, its chunks among the
//! whole list's partial sums), so the ranks together step every tensor as one
//! optimizer over the whole list does.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::{
    config::AdamaxConfig,
    error::Result,
    shard::{Piece, ShardLayout},
    state::FIXED_BY_SHARD,
};

use super::{CudaAdamax, GpuStorage};
use crate::cuda::{launch::Exchange, layout::StateLayout};

impl<T: GpuStorage> CudaAdamax<T> {
    /// The optimizer over rank `rank`'s pieces of `layout` (the caller checked the rank),
    /// its masters copied from the flat parameter buffer at device address
    /// `param_base` (`layout.total()` elements of `T`, checked by the caller).
    pub(crate) fn for_pieces(
        stream: &Arc<CudaStream>,
        config: AdamaxConfig,
        layout: &ShardLayout,
        rank: usize,
        param_base: u64,
    ) -> Result<Self> {
        config.precision.check_storage(T::TYPE)?;
        let (pieces, schedule) = layout.piece_schedule(config, rank)?;
        let lens: Vec<usize> = pieces.iter().map(Piece::len).collect();
        let state = StateLayout::new(lens, schedule.formats().to_vec())?
            .placed(layout.placements(rank), layout.total_chunks())?;
        let mut opt = Self::assemble(stream, schedule, state, true)?;
        opt.formats_fixed = Some(FIXED_BY_SHARD);
        let addresses = piece_addresses::<T>(layout, &pieces, param_base);
        opt.init_master(addresses)?;
        Ok(opt)
    }

    /// Enqueues one step of the pieces, `params[i]` and `grads[i]` the device addresses
    /// of piece `i`'s parameter and gradient (`None`: no gradient this step); `key`
    /// names the flat buffers when every piece has a gradient (the tensor table is then
    /// reused while they do not move). `exchange` is called between the reduction and
    /// the decision when the step decides (see [`Exchange`]).
    ///
    /// # Safety
    ///
    /// Every address holds its piece's elements in the optimizer's context, alive while
    /// the step runs, and no parameter aliases another or a gradient.
    pub(crate) unsafe fn step_pieces(
        &mut self,
        addresses: impl Iterator<Item = (u64, Option<u64>)>,
        key: Option<(u64, u64)>,
        exchange: &mut Exchange<'_>,
    ) -> Result<()> {
        let hypers = self.schedule.hypers();
        self.plan.table.prepare(&self.state, hypers, key, addresses);
        self.enqueue(Some(exchange))
    }
}

impl<T: GpuStorage> CudaAdamax<T> {
    /// Bytes of device memory the state takes (its buffers, padding included).
    pub(crate) fn device_state_bytes(&self) -> u64 {
        self.state.bytes()
    }
}

/// Device addresses of `pieces` in a flat buffer of `T` at `base` laid out as `layout`.
pub(crate) fn piece_addresses<'a, T>(
    layout: &'a ShardLayout,
    pieces: &'a [Piece],
    base: u64,
) -> impl Iterator<Item = u64> + Clone + 'a {
    let size = std::mem::size_of::<T>() as u64;
    pieces
        .iter()
        .map(move |p| base.wrapping_add((layout.offsets()[p.tensor] + p.begin) as u64 * size))
}
