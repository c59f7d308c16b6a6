// Writes the files format2_q8_{inside,denominator}{,_as_f32}.safetensors of
// tests/checkpoint.rs (files_of_the_format_before_the_ratio_load_as_the_state_they_stand_for):
// an 8-bit run's checkpoint in format adamax-cuda/2, and the same checkpoint decoded to
// f32 by that version. Run at commit 6b96f15, the last to write that format, as
// `cargo run --example legacy_fixture -- OUT_DIR` with this file as
// examples/legacy_fixture.rs. Not compiled here.
use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, EpsilonMode, Optimizer, ParamMode, Precision, StateFormat, bf16};
fn main() {
    let out = std::env::args().nth(1).expect("out dir");
    for (name, eps_mode) in [("inside", EpsilonMode::InsideMax), ("denominator", EpsilonMode::Denominator)] {
        let config = AdamaxConfig {
            lr: 1e-2,
            eps_mode,
            precision: Precision { params: ParamMode::Stochastic, state: StateFormat::Blockwise8, seed: 7, min_8bit_len: 0 },
            ..AdamaxConfig::default()
        };
        let lens = [300usize, 64];
        let mut w: Vec<Vec<bf16>> = lens.iter().map(|&n| (0..n).map(|i| bf16::from_f32((i as f32 * 0.37).sin())).collect()).collect();
        let refs: Vec<&[bf16]> = w.iter().map(|v| v.as_slice()).collect();
        let mut opt = CpuAdamax::new(config, &refs).unwrap();
        for t in 0..5u32 {
            let g: Vec<Vec<bf16>> = lens.iter().map(|&n| (0..n).map(|i| {
                let x = ((i as u32 * 7 + t * 3) as f32 * 0.11).cos();
                bf16::from_f32(x * 10f32.powi((i % 9) as i32 - 6))
            }).collect()).collect();
            let gr: Vec<&[bf16]> = g.iter().map(|v| v.as_slice()).collect();
            let mut wm: Vec<&mut [bf16]> = w.iter_mut().map(|v| v.as_mut_slice()).collect();
            opt.step(&mut wm, &gr).unwrap();
        }
        let ck = opt.checkpoint().unwrap();
        ck.save(format!("{out}/format2_q8_{name}.safetensors")).unwrap();
        ck.convert_state(StateFormat::F32).unwrap().save(format!("{out}/format2_q8_{name}_as_f32.safetensors")).unwrap();
    }
}
