//! Property tests of routing and of batch invariance on random layers.

use moge_shared::checkpoint::generate_layer;
use moge_shared::kernels::Kernel;
use moge_shared::layer::MoeLayer;
use moge_shared::routing::{RoutingShape, route_logits};
use moge_shared::{ModelConfig, RoutingMode, RoutingOptions};
use proptest::prelude::*;

/// Builds a small model whose hidden size is not a multiple of 8, so the
/// kernels' tail path runs too.
fn tiny_config(groups: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: 44,
        num_experts: 16,
        num_experts_per_tok: 4,
        moe_intermediate_size: 24,
        shared_expert_intermediate_size: 36,
        num_hidden_layers: 1,
        hidden_act: "silu".to_owned(),
        torch_dtype: "bfloat16".to_owned(),
        n_group: Some(groups),
        topk_group: None,
        norm_topk_prob: false,
    }
}

fn shape(groups: usize) -> RoutingShape {
    RoutingShape::from_config(&tiny_config(groups))
}

fn mode_strategy() -> impl Strategy<Value = RoutingMode> {
    prop_oneof![
        Just(RoutingMode::Moge),
        Just(RoutingMode::TopK),
        Just(RoutingMode::GroupLimited)
    ]
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn moge_takes_k_prime_experts_in_every_group(
        groups in prop_oneof![Just(1usize), Just(2), Just(4)],
        tokens in 0usize..24,
        seed in any::<u64>(),
    ) {
        let shape = shape(groups);
        let logits = random_values(tokens * shape.num_experts, seed, 6.0);
        let scale = vec![1.0; shape.num_experts];
        let routing = route_logits(&logits, tokens, &shape, &scale, RoutingOptions::default()).unwrap();
        let per_group = shape.top_k / shape.num_groups;
        for token in 0..tokens {
            let (ids, _) = routing.token(token);
            for group in 0..shape.num_groups {
                let in_group = ids.iter().filter(|&&id| shape.group_of(id as usize) == group).count();
                prop_assert_eq!(in_group, per_group, "token {} group {}", token, group);
            }
        }
        prop_assert!(routing.group_assignments.iter().all(|&count| count as usize == tokens * per_group));
        prop_assert_eq!(routing.imbalance_score_per_group(), 0.0);
    }

    #[test]
    fn weights_equal_softmax_times_router_scale(
        mode in mode_strategy(),
        tokens in 1usize..8,
        seed in any::<u64>(),
    ) {
        let shape = shape(4);
        let logits = random_values(tokens * shape.num_experts, seed, 4.0);
        let scale = random_values(shape.num_experts, seed ^ 1, 0.5).iter().map(|v| 1.0 + v).collect::<Vec<f32>>();
        let options = RoutingOptions { mode, renormalize: false };
        let routing = route_logits(&logits, tokens, &shape, &scale, options).unwrap();
        for token in 0..tokens {
            let row = &logits[token * shape.num_experts..(token + 1) * shape.num_experts];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let total: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            let (ids, weights) = routing.token(token);
            for (&id, &weight) in ids.iter().zip(weights) {
                let expected = (row[id as usize] as f64 - max).exp() / total * scale[id as usize] as f64;
                prop_assert!((weight as f64 - expected).abs() <= 1e-6 * expected.abs().max(1e-3),
                    "token {} expert {}: {} vs {}", token, id, weight, expected);
            }
        }
    }

    #[test]
    fn moge_imbalance_is_zero_for_any_device_map(
        tokens in 0usize..32,
        seed in any::<u64>(),
        devices in prop::collection::vec(0usize..3, 4),
    ) {
        let shape = shape(4);
        let logits = random_values(tokens * shape.num_experts, seed, 3.0);
        let routing = route_logits(&logits, tokens, &shape, &[1.0; 16], RoutingOptions::default()).unwrap();
        // Each device carries (groups mapped to it) x T x K'; with one group
        // per device that is equal for every device.
        prop_assert_eq!(routing.imbalance_score(&[0, 1, 2, 3]).unwrap(), 0.0);
        let mut per_device = [0usize; 3];
        for &device in &devices {
            per_device[device] += 1;
        }
        let used = devices.iter().max().unwrap() + 1;
        let counts: Vec<usize> = per_device[..used].to_vec();
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        let expected = if tokens == 0 { 0.0 } else { spread as f64 };
        prop_assert_eq!(routing.imbalance_score(&devices).unwrap(), expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A token's output row must not depend on its batch: this is what lets
    /// the gateway batch requests without changing any request's result.
    #[test]
    fn layer_rows_are_batch_invariant_bitwise(
        mode in mode_strategy(),
        groups in prop_oneof![Just(2usize), Just(4)],
        tokens in 1usize..40,
        seed in any::<u64>(),
        order_seed in any::<u64>(),
    ) {
        let layer = layer(groups);
        let h = layer.hidden_size();
        let hidden = random_values(tokens * h, seed, 1.0);
        let options = RoutingOptions { mode, renormalize: false };
        let kernel = Kernel::detect();
        let full = layer.forward(kernel, &hidden, tokens, options).unwrap();

        // A shuffled subset of the rows, in a different batch size.
        let mut rows: Vec<usize> = (0..tokens).collect();
        shuffle(&mut rows, order_seed);
        rows.truncate(1 + (order_seed as usize % tokens));
        let subset: Vec<f32> = rows.iter().flat_map(|&row| hidden[row * h..(row + 1) * h].to_vec()).collect();
        let part = layer.forward(kernel, &subset, rows.len(), options).unwrap();
        for (position, &row) in rows.iter().enumerate() {
            prop_assert_eq!(
                bits(&part.hidden[position * h..(position + 1) * h]),
                bits(&full.hidden[row * h..(row + 1) * h]),
                "row {} at position {} of {}", row, position, rows.len()
            );
            prop_assert_eq!(part.routing.token(position), full.routing.token(row));
        }

        // Each row alone, the decode case.
        let row = rows[0];
        let alone = layer.forward(kernel, &hidden[row * h..(row + 1) * h], 1, options).unwrap();
        prop_assert_eq!(bits(&alone.hidden), bits(&full.hidden[row * h..(row + 1) * h]));
    }
}

#[test]
fn portable_and_simd_kernels_agree_bitwise() {
    let layer = layer(4);
    let tokens = 37;
    let hidden = random_values(tokens * layer.hidden_size(), 99, 1.0);
    for mode in RoutingMode::ALL {
        let options = RoutingOptions {
            mode,
            renormalize: false,
        };
        let fast = layer.forward(Kernel::detect(), &hidden, tokens, options).unwrap();
        let slow = layer.forward(Kernel::Portable, &hidden, tokens, options).unwrap();
        assert_eq!(bits(&fast.hidden), bits(&slow.hidden), "{mode}");
    }
}

#[test]
fn f32_and_stored_weights_agree_bitwise() {
    let layer = layer(4);
    let as_f32 = MoeLayer {
        layer: 0,
        router: layer.router.clone(),
        groups: layer
            .groups
            .iter()
            .map(|group| moge_shared::expert::ExpertGroup {
                group: group.group,
                first_expert: group.first_expert,
                experts: group
                    .experts
                    .iter()
                    .map(|expert| expert.clone().into_format(moge_shared::weights::WeightFormat::F32))
                    .collect(),
            })
            .collect(),
        shared_expert: layer
            .shared_expert
            .clone()
            .into_format(moge_shared::weights::WeightFormat::F32),
    };
    for tokens in [1, 3, 4, 29] {
        let hidden = random_values(tokens * layer.hidden_size(), tokens as u64, 1.0);
        let options = RoutingOptions::default();
        let stored = layer.forward(Kernel::detect(), &hidden, tokens, options).unwrap();
        let converted = as_f32.forward(Kernel::detect(), &hidden, tokens, options).unwrap();
        assert_eq!(bits(&stored.hidden), bits(&converted.hidden), "tokens {tokens}");
    }
}

#[test]
fn non_finite_hidden_state_names_the_token() {
    let layer = layer(4);
    let h = layer.hidden_size();
    let mut hidden = random_values(3 * h, 5, 1.0);
    hidden[2 * h + 7] = f32::INFINITY;
    let error = layer
        .forward(Kernel::detect(), &hidden, 3, RoutingOptions::default())
        .unwrap_err();
    assert!(error.to_string().contains("token 2"), "{error}");
}

fn layer(groups: usize) -> MoeLayer {
    let config = tiny_config(groups);
    generate_layer(&config, 0, 11, 0.0)
}

/// Uniform values in `[-scale, scale)` from a seeded xorshift generator.
fn random_values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn shuffle(values: &mut [usize], seed: u64) {
    let mut state = seed | 1;
    for index in (1..values.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        values.swap(index, (state % (index as u64 + 1)) as usize);
    }
}

#[test]
fn empty_batch_gives_empty_output() {
    let layer = layer(4);
    for mode in RoutingMode::ALL {
        let options = RoutingOptions {
            mode,
            renormalize: false,
        };
        let output = layer.forward(Kernel::detect(), &[], 0, options).unwrap();
        assert!(output.hidden.is_empty(), "{mode}");
        assert!(
            output.routing.group_assignments.iter().all(|&count| count == 0),
            "{mode}"
        );
    }
}
