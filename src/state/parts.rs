//! What a tensor's state is made of: its parts (the moments in f32, or their 8-bit codes
//! and block scales, and the master weights), each with its element type and length,
//! and the values of one part. The checkpoint file, the device buffers and the CPU
//! reference's length checks all read these; which parts a mode has is its row of
//! [`super::modes::MODES`].

use crate::{error::Error, spec::lowbit::QBLOCK};

use super::TensorState;

/// A part of one tensor's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// `m` in f32 (PyTorch's `exp_avg`).
    ExpAvg,
    /// `u` in f32 (PyTorch's `exp_inf`).
    ExpInf,
    /// The f32 master weights of a 16-bit parameter.
    Master,
    /// `m`'s 8-bit codes, one per element: its ratio to the step's denominator
    /// (`spec::lowbit`).
    ExpAvgCodes,
    /// The scales of `m`'s ratios, one per block of [`QBLOCK`] elements.
    ExpAvgScales,
    /// `u`'s 8-bit codes.
    ExpInfCodes,
    /// `u`'s f32 scales.
    ExpInfScales,
}

/// The type of a part's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    U8,
}

impl Elem {
    /// Bytes per value.
    pub(crate) const fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::U8 => 1,
        }
    }
}

impl Part {
    /// Every part, in the order a tensor's entries appear in a file.
    pub(crate) const ALL: [Part; 7] = [
        Part::ExpAvg,
        Part::ExpInf,
        Part::Master,
        Part::ExpAvgCodes,
        Part::ExpAvgScales,
        Part::ExpInfCodes,
        Part::ExpInfScales,
    ];

    /// Its name (a checkpoint's entry is `state.{i}.` this, the master's is named
    /// apart).
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Part::ExpAvg => "exp_avg",
            Part::ExpInf => "exp_inf",
            Part::Master => "master",
            Part::ExpAvgCodes => "exp_avg_q8",
            Part::ExpAvgScales => "exp_avg_q8_scale",
            Part::ExpInfCodes => "exp_inf_q8",
            Part::ExpInfScales => "exp_inf_q8_scale",
        }
    }

    /// The type of its values.
    pub(crate) const fn elem(self) -> Elem {
        match self {
            Part::ExpAvgCodes | Part::ExpInfCodes => Elem::U8,
            _ => Elem::F32,
        }
    }

    /// Whether the values are 8-bit codes (else f32).
    pub(crate) const fn is_codes(self) -> bool {
        matches!(self.elem(), Elem::U8)
    }

    /// Whether the values are one per block of 8-bit state rather than one per element.
    pub(crate) const fn per_block(self) -> bool {
        matches!(self, Part::ExpAvgScales | Part::ExpInfScales)
    }

    /// Values held for a tensor of `n` elements.
    pub(crate) const fn len(self, n: usize) -> usize {
        if self.per_block() {
            n.div_ceil(QBLOCK)
        } else {
            n
        }
    }

    /// The scales of a moment's codes.
    pub(crate) const fn scales(self) -> Option<Part> {
        match self {
            Part::ExpAvgCodes => Some(Part::ExpAvgScales),
            Part::ExpInfCodes => Some(Part::ExpInfScales),
            _ => None,
        }
    }

    /// This part of `t`.
    pub(crate) fn view(self, t: &TensorState) -> View<'_> {
        match self {
            Part::ExpAvg => View::F32(&t.exp_avg),
            Part::ExpInf => View::F32(&t.exp_inf),
            Part::Master => View::F32(&t.master),
            Part::ExpAvgCodes => View::U8(&t.exp_avg_q8.codes),
            Part::ExpAvgScales => View::F32(&t.exp_avg_q8.scales),
            Part::ExpInfCodes => View::U8(&t.exp_inf_q8.codes),
            Part::ExpInfScales => View::F32(&t.exp_inf_q8.scales),
        }
    }

    /// Stores `data` as this part of `t` (its type checked by the caller: an internal
    /// error otherwise).
    pub(crate) fn store(self, t: &mut TensorState, data: Data) -> Result<(), Error> {
        match (self, data) {
            (Part::ExpAvg, Data::F32(v)) => t.exp_avg = v,
            (Part::ExpInf, Data::F32(v)) => t.exp_inf = v,
            (Part::Master, Data::F32(v)) => t.master = v,
            (Part::ExpAvgScales, Data::F32(v)) => t.exp_avg_q8.scales = v,
            (Part::ExpInfScales, Data::F32(v)) => t.exp_inf_q8.scales = v,
            (Part::ExpAvgCodes, Data::U8(v)) => t.exp_avg_q8.codes = v,
            (Part::ExpInfCodes, Data::U8(v)) => t.exp_inf_q8.codes = v,
            _ => {
                return Err(Error::Internal {
                    what: "a part of the state stored from values of another type",
                })
            }
        }
        Ok(())
    }

    /// Zeroed values for a tensor of `n` elements.
    pub(crate) fn zeros(self, n: usize) -> Data {
        match self.elem() {
            Elem::F32 => Data::F32(vec![0.0; self.len(n)]),
            Elem::U8 => Data::U8(vec![0; self.len(n)]),
        }
    }
}

/// The values of one part: f32 (moments, masters, scales) or u8 (8-bit codes).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

impl Data {
    pub(crate) fn len(&self) -> usize {
        self.view().len()
    }

    /// An empty buffer of `elem` values.
    pub(crate) fn empty(elem: Elem) -> Self {
        match elem {
            Elem::F32 => Data::F32(Vec::new()),
            Elem::U8 => Data::U8(Vec::new()),
        }
    }

    /// The type of its values.
    pub(crate) fn elem(&self) -> Elem {
        match self {
            Data::F32(_) => Elem::F32,
            Data::U8(_) => Elem::U8,
        }
    }

    /// The f32 buffer to fill; an internal error if it holds codes.
    pub(crate) fn f32_mut(&mut self) -> Result<&mut Vec<f32>, Error> {
        match self {
            Data::F32(v) => Ok(v),
            Data::U8(_) => Err(Error::Internal {
                what: "an f32 buffer was filled with codes",
            }),
        }
    }

    /// Appends `values`, which must be of this buffer's type.
    pub(crate) fn extend(&mut self, values: View<'_>) -> Result<(), Error> {
        match (self, values) {
            (Data::F32(b), View::F32(v)) => b.extend_from_slice(v),
            (Data::U8(b), View::U8(v)) => b.extend_from_slice(v),
            _ => {
                return Err(Error::Internal {
                    what: "a buffer was filled with values of another type",
                })
            }
        }
        Ok(())
    }

    pub(crate) fn view(&self) -> View<'_> {
        match self {
            Data::F32(v) => View::F32(v),
            Data::U8(v) => View::U8(v),
        }
    }
}

/// Borrowed values of one part.
#[derive(Clone, Copy, Debug)]
pub(crate) enum View<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
}

impl<'a> View<'a> {
    /// Values `at`.
    pub(crate) fn slice(self, at: std::ops::Range<usize>) -> View<'a> {
        match self {
            View::F32(v) => View::F32(&v[at]),
            View::U8(v) => View::U8(&v[at]),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            View::F32(v) => v.len(),
            View::U8(v) => v.len(),
        }
    }
}
