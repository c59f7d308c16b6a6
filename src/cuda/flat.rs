//! The flat-buffer path: every parameter tensor a view into one allocation, every
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

use super::{
    device::check_devices,
    optimizer::{CudaAdamax, GpuStorage},
};

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

/// The buffer must hold the layout.
fn check_len(what: &'static str, found: usize, total: usize) -> Result<()> {
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
        check_len("flat params", params.len(), layout.total)?;
        let mut opt = Self::allocate(stream, config, layout.lens.clone())?;
        {
            let (base, _guard) = params.device_ptr(stream);
            let size = std::mem::size_of::<T>() as u64;
            opt.init_master(layout.offsets.iter().map(|&o| base + o as u64 * size))?;
        }
        opt.set_flat(layout);
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
        let total = self.flat_total().ok_or(Error::NotFlat)?;
        check_len("flat params", params.len(), total)?;
        check_len("flat grads", grads.len(), total)?;
        let stream = self.stream().clone();
        check_devices(&stream, "flat params", [Some(&*params)])?;
        check_devices(&stream, "flat grads", [Some(grads)])?;
        // Held until the launch is enqueued: cudarc orders this stream after other
        // streams' writes to the buffers, and records our use when they drop.
        let (param_base, _param_guard) = params.device_ptr_mut(&stream);
        let (grad_base, _grad_guard) = grads.device_ptr(&stream);
        self.enqueue_flat(param_base, grad_base)
    }
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
