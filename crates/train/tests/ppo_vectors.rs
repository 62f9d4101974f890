//! Every vector of `tests/fixtures/ppo/ppo_vectors.json` (numpy float64, re-checked by a torch
//! trlX-style version), reproduced by the f64 math; the tensor losses agree with the f64 ones.

use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use vicuna_train::ppo_math::*;

fn vectors() -> Value {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/ppo/ppo_vectors.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(f).collect()
}

fn vec2(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(vec1).collect()
}

/// 1e-12 relative plus 1e-12 absolute, the README's float64 tolerance.
fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-12 + 1e-12 * want.abs(), "{what}: got {got}, want {want}");
}

fn close1(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(*g, *w, &format!("{what}[{i}]"));
    }
}

fn close2(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (b, (g, w)) in got.iter().zip(want).enumerate() {
        close1(g, w, &format!("{what}[{b}]"));
    }
}

fn cases(section: &str) -> Vec<Value> {
    let v = vectors();
    let cases = v[section].as_array().unwrap().clone();
    assert_eq!(cases.len(), 3, "{section}");
    cases
}

#[test]
fn kl_controller_matches() {
    for case in cases("kl_controller") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let mut ctl = KlController::new(f(&i["init_kl_coef"]), Some(f(&i["target"])), f(&i["horizon"]));
        let n_steps = i["n_steps"].as_u64().unwrap() as usize;
        let (mut errors, mut mults, mut betas) = (vec![], vec![], vec![]);
        for current in vec1(&i["currents"]) {
            let u = ctl.update(current, n_steps);
            errors.push(u.proportional_error);
            mults.push(u.mult);
            betas.push(ctl.value);
        }
        let name = case["name"].as_str().unwrap();
        close1(&errors, &vec1(&o["proportional_errors"]), &format!("{name} errors"));
        close1(&mults, &vec1(&o["mults"]), &format!("{name} mults"));
        close1(&betas, &vec1(&o["betas"]), &format!("{name} betas"));
    }
}

#[test]
fn fixed_kl_controller_never_moves() {
    let mut ctl = KlController::new(0.05, None, 10000.0);
    ctl.update(100.0, 16);
    assert_eq!(ctl.value, 0.05);
}

#[test]
fn rewards_match() {
    for case in cases("rewards") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let got = kl_penalized_rewards(
            &vec2(&i["logprobs"]),
            &vec2(&i["ref_logprobs"]),
            &vec2(&i["mask"]),
            &vec1(&i["scores"]),
            f(&i["beta"]),
            Some(f(&i["cliprange_reward"])),
        )
        .unwrap();
        let name = case["name"].as_str().unwrap();
        close1(&got.scores_clipped, &vec1(&o["scores_clipped"]), name);
        let last: Vec<usize> =
            o["last_index"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(got.last_index, last, "{name}");
        close2(&got.rewards, &vec2(&o["rewards"]), name);
    }
}

#[test]
fn gae_and_whitening_match() {
    for case in cases("gae") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let name = case["name"].as_str().unwrap();
        let (adv, ret) = gae(&vec2(&i["rewards"]), &vec2(&i["values"]), f(&i["gamma"]), f(&i["lam"]));
        close2(&adv, &vec2(&o["advantages"]), &format!("{name} advantages"));
        close2(&ret, &vec2(&o["returns"]), &format!("{name} returns"));
        let mask = vec2(&i["mask"]);
        for (variant, mask) in [("whiten_trlx_full_unbiased", None), ("whiten_masked_unbiased", Some(&mask[..]))] {
            let w = whiten(&adv, mask);
            let want = &o[variant];
            close(w.mean, f(&want["mean"]), &format!("{name} {variant} mean"));
            close(w.var, f(&want["var"]), &format!("{name} {variant} var"));
            assert_eq!(w.n as u64, want["n"].as_u64().unwrap(), "{name} {variant} n");
            close2(&w.values, &vec2(&want["advantages"]), &format!("{name} {variant}"));
        }
    }
}

fn loss_inputs(i: &Value) -> [Vec<Vec<f64>>; 7] {
    ["logprobs", "values", "old_logprobs", "old_values", "advantages", "returns", "mask"].map(|k| vec2(&i[k]))
}

fn loss_params(i: &Value) -> PpoLossParams {
    PpoLossParams {
        cliprange: f(&i["cliprange"]),
        cliprange_value: f(&i["cliprange_value"]),
        vf_coef: f(&i["vf_coef"]),
    }
}

#[test]
fn ppo_loss_matches() {
    for case in cases("ppo_loss") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let name = case["name"].as_str().unwrap();
        let [logprobs, values, old_logprobs, old_values, advantages, returns, mask] = loss_inputs(i);
        let x = PpoLossInputs {
            logprobs: &logprobs,
            values: &values,
            old_logprobs: &old_logprobs,
            old_values: &old_values,
            advantages: &advantages,
            returns: &returns,
            mask: &mask,
        };
        let got = ppo_loss_f64(&x, &loss_params(i));
        let s = got.stats;
        assert_eq!(s.n as u64, o["n"].as_u64().unwrap(), "{name}");
        for (value, key) in [
            (s.pg_loss, "pg_loss"),
            (s.vf_loss, "vf_loss"),
            (s.loss, "loss"),
            (s.pg_clipfrac, "pg_clipfrac"),
            (s.vf_clipfrac, "vf_clipfrac"),
            (s.approx_kl, "approx_kl"),
            (s.approx_kl_masked_mean, "approx_kl_masked_mean"),
        ] {
            close(value, f(&o[key]), &format!("{name} {key}"));
        }
        close2(&got.ratio, &vec2(&o["ratio"]), &format!("{name} ratio"));
        // values_clipped at padding comes from garbage: compare real tokens only.
        let want = vec2(&o["values_clipped"]);
        for b in 0..mask.len() {
            for t in 0..mask[b].len() {
                if mask[b][t] != 0.0 {
                    close(got.values_clipped[b][t], want[b][t], &format!("{name} values_clipped[{b}][{t}]"));
                }
            }
        }
    }
}

#[test]
fn reward_model_loss_matches() {
    for case in cases("reward_model_loss") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let name = case["name"].as_str().unwrap();
        let got = pairwise_loss_f64(&vec1(&i["r_chosen"]), &vec1(&i["r_rejected"]));
        close1(&got.diff, &vec1(&o["diff"]), name);
        close1(&got.per_pair_loss, &vec1(&o["per_pair_loss"]), name);
        close(got.loss, f(&o["loss"]), name);
        close(got.accuracy, f(&o["accuracy"]), name);
    }
}

/// The whole chain rewards → gae → ppo_loss with index I is one pipeline: run it from the rewards
/// inputs and land on the ppo_loss outputs.
#[test]
fn pipeline_end_to_end() {
    let (r, g, l) = (cases("rewards"), cases("gae"), cases("ppo_loss"));
    for k in 0..3 {
        let ri = &r[k]["inputs"];
        let mask = vec2(&ri["mask"]);
        let rewards = kl_penalized_rewards(
            &vec2(&ri["logprobs"]),
            &vec2(&ri["ref_logprobs"]),
            &mask,
            &vec1(&ri["scores"]),
            f(&ri["beta"]),
            Some(f(&ri["cliprange_reward"])),
        )
        .unwrap();
        let gi = &g[k]["inputs"];
        let old_values = vec2(&gi["values"]);
        let (adv, returns) = gae(&rewards.rewards, &old_values, f(&gi["gamma"]), f(&gi["lam"]));
        let adv = whiten(&adv, None).values;
        let old_logprobs: Vec<Vec<f64>> = vec2(&ri["logprobs"])
            .iter()
            .zip(&mask)
            .map(|(row, m)| row.iter().zip(m).map(|(x, m)| x * m).collect())
            .collect();
        let li = &l[k]["inputs"];
        let x = PpoLossInputs {
            logprobs: &vec2(&li["logprobs"]),
            values: &vec2(&li["values"]),
            old_logprobs: &old_logprobs,
            old_values: &old_values,
            advantages: &adv,
            returns: &returns,
            mask: &mask,
        };
        let got = ppo_loss_f64(&x, &loss_params(li));
        close(got.stats.loss, f(&l[k]["outputs"]["loss"]), &format!("pipeline {k}"));
    }
}

fn tensor(rows: &[Vec<f64>]) -> Tensor {
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap()
}

/// The float32 tolerance of the README: 1e-5 relative with a 1e-5 floor.
fn close32(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-5 + 1e-5 * want.abs(), "{what}: got {got}, want {want}");
}

#[test]
fn tensor_ppo_loss_agrees_with_f64_and_its_gradient_is_right() {
    for case in cases("ppo_loss") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let name = case["name"].as_str().unwrap();
        let [logprobs, values, old_logprobs, old_values, advantages, returns, mask] = loss_inputs(i);
        let lp = Var::from_tensor(&tensor(&logprobs)).unwrap();
        let v = Var::from_tensor(&tensor(&values)).unwrap();
        let x = PpoLossTensors {
            logprobs: lp.as_tensor(),
            values: v.as_tensor(),
            old_logprobs: &tensor(&old_logprobs),
            old_values: &tensor(&old_values),
            advantages: &tensor(&advantages),
            returns: &tensor(&returns),
            mask: &tensor(&mask),
        };
        let (loss, s) = ppo_loss(&x, &loss_params(i)).unwrap();
        for (value, key) in [
            (s.loss, "loss"),
            (s.pg_loss, "pg_loss"),
            (s.vf_loss, "vf_loss"),
            (s.pg_clipfrac, "pg_clipfrac"),
            (s.vf_clipfrac, "vf_clipfrac"),
            (s.approx_kl, "approx_kl"),
            (s.approx_kl_masked_mean, "approx_kl_masked_mean"),
        ] {
            close32(value, f(&o[key]), &format!("{name} tensor {key}"));
        }
        // Gradient of the tensor loss vs central differences of the f64 loss: the clip edges are
        // ≥ 1e-3 away from every real token, so a 1e-6 step never crosses one.
        let grads = loss.backward().unwrap();
        let g_lp: Vec<Vec<f32>> = grads.get(lp.as_tensor()).unwrap().to_vec2().unwrap();
        let g_v: Vec<Vec<f32>> = grads.get(v.as_tensor()).unwrap().to_vec2().unwrap();
        let params = loss_params(i);
        let eval = |lp: &[Vec<f64>], v: &[Vec<f64>]| {
            let x = PpoLossInputs {
                logprobs: lp,
                values: v,
                old_logprobs: &old_logprobs,
                old_values: &old_values,
                advantages: &advantages,
                returns: &returns,
                mask: &mask,
            };
            ppo_loss_f64(&x, &params).stats.loss
        };
        let h = 1e-6;
        for b in 0..mask.len() {
            for t in 0..mask[b].len() {
                for (which, g) in [(0, &g_lp), (1, &g_v)] {
                    let (mut plus_lp, mut plus_v) = (logprobs.clone(), values.clone());
                    let (mut minus_lp, mut minus_v) = (logprobs.clone(), values.clone());
                    if which == 0 {
                        plus_lp[b][t] += h;
                        minus_lp[b][t] -= h;
                    } else {
                        plus_v[b][t] += h;
                        minus_v[b][t] -= h;
                    }
                    let numeric = (eval(&plus_lp, &plus_v) - eval(&minus_lp, &minus_v)) / (2.0 * h);
                    let auto = g[b][t] as f64;
                    assert!(
                        (auto - numeric).abs() <= 1e-4 + 1e-4 * numeric.abs(),
                        "{name} grad {which} [{b}][{t}]: autograd {auto}, finite difference {numeric}"
                    );
                    if mask[b][t] == 0.0 {
                        assert_eq!(auto, 0.0, "padding must get no gradient");
                    }
                }
            }
        }
    }
}

#[test]
fn tensor_pairwise_loss_agrees_with_f64() {
    for case in cases("reward_model_loss") {
        let (i, o) = (&case["inputs"], &case["outputs"]);
        let chosen = vec1(&i["r_chosen"]);
        let rejected = vec1(&i["r_rejected"]);
        let c = Var::from_tensor(&tensor(std::slice::from_ref(&chosen)).squeeze(0).unwrap()).unwrap();
        let r = tensor(std::slice::from_ref(&rejected)).squeeze(0).unwrap();
        let (loss, accuracy) = pairwise_loss(c.as_tensor(), &r).unwrap();
        close32(loss.to_scalar::<f32>().unwrap() as f64, f(&o["loss"]), "tensor rm loss");
        assert_eq!(accuracy, f(&o["accuracy"]));
        // d loss / d r_chosen = −σ(−diff) / n
        let g: Vec<f32> = loss.backward().unwrap().get(c.as_tensor()).unwrap().to_vec1().unwrap();
        let n = chosen.len() as f64;
        for (k, d) in vec1(&o["diff"]).iter().enumerate() {
            let want = -1.0 / (1.0 + d.exp()) / n;
            close32(g[k] as f64, want, "rm grad");
        }
    }
}

#[test]
fn running_moments_follow_the_batch_statistics() {
    // Two batches folded in equal one batch of their union (the count starts at 1e-24, so the
    // initial mean 0 / variance 1 weigh nothing).
    let (a, b) = ([1.0, 2.0, 4.0], [-3.0, 0.5]);
    let mut rm = RunningMoments::default();
    let (mean_a, std_a) = rm.update(&a);
    assert!((mean_a - 7.0 / 3.0).abs() < 1e-12);
    assert!(
        (std_a
            - (((1.0f64 - 7.0 / 3.0).powi(2) + (2.0f64 - 7.0 / 3.0).powi(2) + (4.0f64 - 7.0 / 3.0).powi(2)) / 2.0)
                .sqrt())
        .abs()
            < 1e-12
    );
    rm.update(&b);
    let all = [1.0, 2.0, 4.0, -3.0, 0.5];
    let mean = all.iter().sum::<f64>() / 5.0;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 5.0;
    assert!((rm.mean - mean).abs() < 1e-9 && (rm.var - var).abs() < 1e-9, "{rm:?}");
    assert!((rm.std - (var * 5.0 / 4.0).sqrt()).abs() < 1e-9);
}

#[test]
fn reward_scaling_clips_records_and_divides() {
    let mut stats = ScoreStats::default();
    let scaled = stats.clip_and_scale(&[20.0, 0.0, -2.0], Some(10.0), RewardScaling::Ref);
    let ref_std = stats.ref_std.unwrap();
    // clipped [10, 0, −2]: mean 8/3, unbiased std
    let mean = 8.0 / 3.0;
    let want = (((10.0f64 - mean).powi(2) + mean.powi(2) + (-2.0f64 - mean).powi(2)) / 2.0).sqrt();
    assert!((ref_std - want).abs() < 1e-12);
    assert!((scaled[0] - 10.0 / want).abs() < 1e-12);
    let unscaled = ScoreStats::default().clip_and_scale(&[20.0, 0.0, -2.0], Some(10.0), RewardScaling::None);
    assert_eq!(unscaled, vec![10.0, 0.0, -2.0]);
}

#[test]
fn response_kl_is_an_unbiased_never_negative_kl_estimate() {
    // Two categorical token distributions far apart, as a trained policy and its reference become.
    // The expectation of the estimate over tokens drawn from the policy, taken exactly, is the KL
    // (trlX's estimator, with the ratio the other way up, gives χ² − KL here: 7.4 instead of 1.7).
    let policy = [0.7, 0.2, 0.1];
    let reference = [0.05, 0.15, 0.8];
    let kl: f64 = policy.iter().zip(&reference).map(|(p, q): (&f64, &f64)| p * (p / q).ln()).sum();
    let expected: f64 = policy.iter().zip(&reference).map(|(p, q)| p * response_kl(&[p.ln()], &[q.ln()])).sum();
    close(expected, kl, "E_policy[response_kl]");
    for (p, q) in policy.iter().zip(&reference) {
        assert!(response_kl(&[p.ln()], &[q.ln()]) >= 0.0, "each sample's estimate is >= 0");
    }
    // A response sums its tokens' estimates, and one the reference would sample alike costs nothing.
    let (lp, ref_lp) = ([0.7f64.ln(), 0.1f64.ln()], [0.05f64.ln(), 0.8f64.ln()]);
    close(response_kl(&lp, &ref_lp), response_kl(&lp[..1], &ref_lp[..1]) + response_kl(&lp[1..], &ref_lp[1..]), "sum");
    assert_eq!(response_kl(&lp, &lp), 0.0);
}
