//! Uses this crate and cudarc together, as a stack built on cudarc would.

use adamax_cuda::{cuda, AdamaxConfig, Optimizer};

fn main() -> Result<(), adamax_cuda::Error> {
    let stream = cuda::default_stream(0)?;
    let mut params =
        stream
            .alloc_zeros::<f32>(1024)
            .map_err(|source| adamax_cuda::Error::Driver {
                context: "allocating",
                source,
            })?;
    let grads = stream
        .alloc_zeros::<f32>(1024)
        .map_err(|source| adamax_cuda::Error::Driver {
            context: "allocating",
            source,
        })?;
    let mut opt =
        cuda::CudaAdamax::<f32>::new(&stream, AdamaxConfig::default(), &[params.as_view()])?;
    Optimizer::step(&mut opt, &mut [params.as_view_mut()], &[grads.as_view()])?;
    println!("step {}", opt.step_count()?);
    Ok(())
}
