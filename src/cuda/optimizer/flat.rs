//! The flat-buffer path of [`CudaAdamax`]: every parameter tensor a view into one allocation, every
//! gradient into another with the same layout (the contiguous buffers of Apex and
//! Megatron). A step then takes two buffers whatever the tensor count: two device
//! addresses, two of cudarc's event operations, and while neither buffer moves (nor
//! the per-tensor settings) the tensor table already on the device is reused as it is,
//! so the host work per step does not grow with the number of tensors, and nothing is
//! allocated.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::{
    config::AdamaxConfig,
    error::{Error, Result},
};

use super::{CudaAdamax, GpuStorage};
use crate::cuda::{device::check_devices, layout::FlatLayout};

/// The buffer must hold the layout (also the sharded optimizer's flat buffers).
pub(crate) fn check_len(what: &'static str, found: usize, total: usize) -> Result<()> {
    if found < total {
        return Err(Error::BufferTooSmall {
            what,
            needed: total,
            found,
        });
    }
    Ok(())
}

impl<T: GpuStorage> CudaAdamax<T> {
    /// An optimizer over the tensors of `layout` in the flat buffer `params` (for
    /// 16-bit `T`, the masters are copied from it). Step it with
    /// [`CudaAdamax::step_flat`]; the per-tensor API ([`CudaAdamax::step`] with views)
    /// works on it too.
    pub fn new_flat<P: DevicePtr<T>>(
        stream: &Arc<CudaStream>,
        config: AdamaxConfig,
        params: &P,
        layout: FlatLayout,
    ) -> Result<Self> {
        check_devices(stream, "flat params", [Some(params)])?;
        check_len("flat params", params.len(), layout.total())?;
        let mut opt = Self::allocate(stream, config, layout.lens().to_vec())?;
        {
            let (base, _guard) = params.device_ptr(stream);
            let size = std::mem::size_of::<T>() as u64;
            opt.init_master(layout.offsets().iter().map(|&o| base + o as u64 * size))?;
        }
        opt.flat = Some(layout);
        Ok(opt)
    }

    /// One step of every tensor, with parameters and gradients in flat buffers laid
    /// out as the optimizer's [`FlatLayout`]. Checked before anything is enqueued: the
    /// optimizer was built with [`CudaAdamax::new_flat`], both buffers hold the layout
    /// and live in the optimizer's context.
    pub fn step_flat<P: DevicePtrMut<T>, G: DevicePtr<T>>(
        &mut self,
        params: &mut P,
        grads: &G,
    ) -> Result<()> {
        let total = self.flat.as_ref().ok_or(Error::NotFlat)?.total();
        check_len("flat params", params.len(), total)?;
        check_len("flat grads", grads.len(), total)?;
        let stream = self.stream().clone();
        check_devices(&stream, "flat params", [Some(&*params)])?;
        check_devices(&stream, "flat grads", [Some(grads)])?;
        // Held until the launch is enqueued: cudarc orders this stream after other
        // streams' writes to the buffers, and records our use when they drop.
        let (param_base, _param_guard) = params.device_ptr_mut(&stream);
        let (grad_base, _grad_guard) = grads.device_ptr(&stream);
        // The table is rebuilt only when the buffers moved since it was built.
        if let Some(layout) = &self.flat {
            let size = std::mem::size_of::<T>() as u64;
            let addresses = layout.offsets().iter().map(|&o| {
                let at = o as u64 * size;
                (param_base + at, Some(grad_base + at))
            });
            let key = Some((param_base, grad_base));
            let hypers = self.schedule.hypers();
            self.plan.table.prepare(&self.state, hypers, key, addresses);
        }
        self.enqueue(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_buffer_says_how_many_elements_the_layout_needs() {
        let e = check_len("flat grads", 9, 10).unwrap_err();
        assert!(matches!(
            e,
            Error::BufferTooSmall {
                what: "flat grads",
                needed: 10,
                found: 9
            }
        ));
        assert!(e.to_string().contains("needs 10"), "{e}");
        assert!(check_len("flat grads", 11, 10).is_ok());
    }
}
