//! The model both optimizers step: GPT-2 small's parameter shapes (148 tensors, 124M
//! parameters) on a GPU, a narrower model of the same structure on the CPU.

/// GPT-2's parameter shapes with `hidden` channels, `layers` blocks, a vocabulary of
/// `vocab` and `context` positions (GPT-2 small: 768, 12, 50257, 1024).
pub fn gpt2_shapes(hidden: usize, layers: usize, vocab: usize, context: usize) -> Vec<Vec<usize>> {
    let mut shapes = vec![vec![vocab, hidden], vec![context, hidden]];
    for _ in 0..layers {
        shapes.extend([
            vec![hidden],             // ln_1 weight
            vec![hidden],             // ln_1 bias
            vec![hidden, 3 * hidden], // attn.c_attn weight
            vec![3 * hidden],         // attn.c_attn bias
            vec![hidden, hidden],     // attn.c_proj weight
            vec![hidden],             // attn.c_proj bias
            vec![hidden],             // ln_2 weight
            vec![hidden],             // ln_2 bias
            vec![hidden, 4 * hidden], // mlp.c_fc weight
            vec![4 * hidden],         // mlp.c_fc bias
            vec![4 * hidden, hidden], // mlp.c_proj weight
            vec![hidden],             // mlp.c_proj bias
        ]);
    }
    shapes.extend([vec![hidden], vec![hidden]]); // ln_f
    shapes
}

/// The shapes benchmarked: GPT-2 small on a GPU, a 1/6-width two-layer model on the
/// CPU (where a step of 124M parameters takes seconds).
pub fn model_shapes(gpu: bool) -> Vec<Vec<usize>> {
    if gpu {
        gpt2_shapes(768, 12, 50257, 1024)
    } else {
        gpt2_shapes(128, 2, 4096, 256)
    }
}

#[cfg(test)]
mod tests {
    /// GPT-2 small has 148 parameter tensors and 124,439,808 parameters (Hugging
    /// Face's `gpt2` checkpoint).
    #[test]
    fn gpt2_small_has_its_published_size() {
        let s = super::gpt2_shapes(768, 12, 50257, 1024);
        assert_eq!(s.len(), 148);
        assert_eq!(
            s.iter().map(|d| d.iter().product::<usize>()).sum::<usize>(),
            124_439_808
        );
    }
}
