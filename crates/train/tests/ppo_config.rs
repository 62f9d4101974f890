//! The PPO settings: the shipped StableVicuna config reads back as the card's values, flags
//! override, and mistakes are reported with file and line.

use std::path::PathBuf;

use vicuna_train::ppo_config::PpoConfig;
use vicuna_train::ppo_math::RewardScaling;

#[test]
fn shipped_config_is_the_card_table() {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/stable_vicuna_ppo.yaml"));
    let mut config = PpoConfig::default();
    config.apply_yaml(&std::fs::read_to_string(&path).unwrap(), "stable_vicuna_ppo.yaml").unwrap();
    assert_eq!(config, PpoConfig::default(), "the file and the defaults must say the same");
    assert_eq!((config.num_rollouts, config.chunk_size, config.ppo_epochs), (128, 16, 4));
    assert_eq!((config.init_kl_coef, config.target, config.horizon), (0.1, Some(6.0), 10000.0));
    assert_eq!((config.gamma, config.lam, config.cliprange, config.cliprange_value), (1.0, 0.95, 0.2, 0.2));
    assert_eq!((config.vf_coef, config.scale_reward, config.cliprange_reward), (1.0, RewardScaling::None, Some(10.0)));
    assert_eq!(
        (config.max_length, config.min_length, config.max_new_tokens),
        (Some(512), Some(48), None),
        "the card's gen_kwargs are max_length 512 and min_length 48 (prompt included)"
    );
    assert_eq!((config.top_k, config.top_p, config.do_sample, config.temperature), (0, 1.0, true, 1.0));
    assert_eq!((config.lr, config.betas, config.eps, config.weight_decay), (1.0e-6, (0.9, 0.95), 1.0e-8, 1.0e-6));
}

#[test]
fn flags_override_and_bad_input_is_located() {
    let mut config = PpoConfig::default();
    config.apply_yaml("method:\n  target: null # fixed beta\n  scale_reward: running\n", "a.yaml").unwrap();
    assert_eq!((config.target, config.scale_reward), (None, RewardScaling::Running));
    config.apply_flags(&["--num-rollouts".into(), "64".into(), "--lora_targets=q_proj,k_proj".into()]).unwrap();
    assert_eq!(config.num_rollouts, 64);
    assert_eq!(config.lora_targets, vec!["q_proj", "k_proj"]);
    let err = config.apply_yaml("train:\n  epochs: 3\n  epoch: 4\n", "b.yaml").unwrap_err().to_string();
    assert!(err.starts_with("b.yaml:3: unknown key `epoch`"), "{err}");
    let err = config.apply_yaml("lr: fast\n", "c.yaml").unwrap_err().to_string();
    assert!(err.starts_with("c.yaml:1: `lr` must be a number"), "{err}");
    assert!(config.apply_flags(&["--lr".into()]).unwrap_err().to_string().contains("needs a value"));
    assert!(PpoConfig::default().validate().unwrap_err().to_string().contains("model_path"));
}

/// `max_length` / `min_length` count the prompt, as in transformers; the `*_new_tokens` keys win when set.
#[test]
fn lengths_have_transformers_meanings() {
    let mut config = PpoConfig::default();
    assert_eq!(config.response_lengths(100), (412, 0), "512 - 100 at most; min_length 48 < 100 bans nothing");
    assert_eq!(config.response_lengths(30), (482, 18), "EOS banned for 48 - 30 tokens");
    assert_eq!(config.max_prompt_tokens(), 511, "a prompt keeps room for one new token");
    config.apply_flags(&["--max-new-tokens".into(), "64".into(), "--min-new-tokens".into(), "4".into()]).unwrap();
    assert_eq!(config.response_lengths(30), (64, 4));
    assert_eq!(config.max_prompt_tokens(), 1024 - 64);
    config.apply_yaml("gen_kwargs:\n  max_new_tokens: null\n  max_length: null\n", "d.yaml").unwrap();
    config.model_path = "m".into();
    config.reward_model_path = "r".into();
    config.prompts_path = "p".into();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("max_length") && err.contains("max_new_tokens"), "{err}");
    config.max_length = Some(2048);
    assert!(config.validate().unwrap_err().to_string().contains("seq_length"));
}
