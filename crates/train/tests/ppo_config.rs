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
    config.set("num-rollouts", "64").unwrap();
    config.set("lora_targets", "q_proj,k_proj").unwrap();
    assert_eq!(config.num_rollouts, 64);
    assert_eq!(config.lora_targets, vec!["q_proj", "k_proj"]);
    let err = config.apply_yaml("train:\n  epochs: 3\n  epoch: 4\n", "b.yaml").unwrap_err().to_string();
    assert!(err.starts_with("b.yaml:3: unknown key `epoch`; known keys: model_path,"), "{err}");
    let err = config.apply_yaml("lr: fast\n", "c.yaml").unwrap_err().to_string();
    assert_eq!(err, "c.yaml:1: `lr` must be a number, found \"fast\"");
    assert!(config.set("lr", "fast").unwrap_err().contains("`lr` must be a number"));
    assert!(config.set("learning_rate", "1").unwrap_err().starts_with("unknown key `learning_rate`"));
    assert!(PpoConfig::default().validate().unwrap_err().to_string().contains("model_path"));
}

/// The YAML reader is a real one: flow lists, quoting, comments, `---`, nested trlX sections (`kwargs:`), and
/// integers written as floats; the flags read the same forms.
#[test]
fn yaml_forms_and_flag_forms_agree() {
    let mut config = PpoConfig::default();
    let text = "---\n# trlX layout\noptimizer:\n  kwargs:\n    lr: 3.0e-5\n    betas: [0.8, 0.9]  # flow list\n\
                model:\n  model_path: 'my policy'\n  lora_targets:\n    - q_proj\n    - \"o_proj\"\n\
                train:\n  total_steps: 1.0e4\n  skip_bad_rows: yes\nmethod:\n  cliprange_reward: 0\n  target: ~\n";
    config.apply_yaml(text, "t.yaml").unwrap();
    assert_eq!((config.lr, config.betas), (3.0e-5, (0.8, 0.9)));
    assert_eq!(config.model_path, PathBuf::from("my policy"));
    assert_eq!(config.lora_targets, vec!["q_proj", "o_proj"]);
    assert_eq!((config.total_steps, config.skip_bad_rows), (10000, true));
    assert_eq!((config.cliprange_reward, config.target), (None, None), "a score clip of 0 is none");

    let mut flags = PpoConfig::default();
    for (key, value) in [
        ("lr", "3.0e-5"),
        ("betas", "0.8,0.9"),
        ("model-path", "my policy"),
        ("lora-targets", "[q_proj, o_proj]"),
        ("total-steps", "1.0e4"),
        ("skip-bad-rows", "yes"),
        ("cliprange-reward", "0"),
        ("target", "null"),
    ] {
        flags.set(key, value).unwrap();
    }
    assert_eq!(flags, config);
    assert_eq!(
        PpoConfig::default().apply_yaml("", "empty.yaml").map(|_| ()).ok(),
        Some(()),
        "an empty file is no change"
    );
}

/// Every mistake is one line naming the file and the line of the value, and saying what was expected.
#[test]
fn yaml_errors_name_file_line_and_fix() {
    let cases = [
        (
            "train:\n  epochs: 2\n  batch_size: many\n",
            "e.yaml:3: `batch_size` must be a whole number ≥ 0, found \"many\"",
        ),
        ("train:\n  epochs: -1\n", "e.yaml:2: `epochs` must be a whole number ≥ 0, found -1"),
        ("train:\n  epochs 2\n", "e.yaml:2: expected `key: value` under `train:`, found \"epochs 2\""),
        (
            "optimizer:\n  betas: [0.9]\n",
            "e.yaml:2: `betas` must be a list of two numbers such as [0.9, 0.95], found a list",
        ),
        ("gen_kwargs:\n\n  do_sample: maybe\n", "e.yaml:3: `do_sample` must be true or false, found \"maybe\""),
        (
            "method:\n  scale_reward: always\n",
            "e.yaml:2: `scale_reward` must be null, running or ref, found \"always\"",
        ),
        ("method:\n  target: high\n", "e.yaml:2: `target` must be a number, found \"high\" (or null)"),
        ("lr:\n  value: 1\n", "e.yaml:2: `lr` takes a value, not a section of keys"),
        ("model:\n  lora_targets: 3\n", "e.yaml:2: `lora_targets` must be a list such as [q_proj, v_proj], found 3"),
        ("- lr\n", "e.yaml:1: expected `key: value` lines, found a list"),
    ];
    for (text, expected) in cases {
        let err = PpoConfig::default().apply_yaml(text, "e.yaml").unwrap_err().to_string();
        assert_eq!(err, expected, "for {text:?}");
    }
    // A YAML syntax error is the parser's message, still with the file and line.
    let err = PpoConfig::default().apply_yaml("train:\n  epochs: [1, 2\n", "s.yaml").unwrap_err().to_string();
    assert!(err.starts_with("s.yaml:"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

/// `max_length` / `min_length` count the prompt, as in transformers; the `*_new_tokens` keys win when set.
#[test]
fn lengths_have_transformers_meanings() {
    let mut config = PpoConfig::default();
    assert_eq!(config.response_lengths(100), (412, 0), "512 - 100 at most; min_length 48 < 100 bans nothing");
    assert_eq!(config.response_lengths(30), (482, 18), "EOS banned for 48 - 30 tokens");
    assert_eq!(config.max_prompt_tokens(), 511, "a prompt keeps room for one new token");
    config.set("max-new-tokens", "64").unwrap();
    config.set("min-new-tokens", "4").unwrap();
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
