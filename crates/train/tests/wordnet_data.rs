//! models/demo/build_data.py (the demo model's data, from WordNet) on the small WordNet-format fixture in
//! models/demo/testdata/wordnet: every file it writes reads back through `data::load` as the rows `train sft`,
//! `train rm` and `train ppo` use, two runs are byte-identical, and the held-out words are not in training.
//! Needs python3; without it the test says so and skips (fails under VICUNA_REQUIRE_REAL_CLIENTS=1).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use vicuna_train::data::{self, render, Dataset};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const FILES: [&str; 6] = ["sft_train", "sft_heldout", "rm_train", "rm_heldout", "ppo_train", "ppo_heldout"];

fn python() -> Option<String> {
    let python = std::env::var("VICUNA_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let found = Command::new(&python).arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return Some(python);
    }
    let why = format!("no {python} to run models/demo/build_data.py");
    if std::env::var("VICUNA_REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("VICUNA_REQUIRE_REAL_CLIENTS=1 but {why}");
    }
    eprintln!("skipped: {why}");
    None
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicuna-wordnet-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn fixture() -> PathBuf {
    Path::new(ROOT).join("models/demo/testdata/wordnet")
}

/// Runs the builder on a WordNet folder.
fn run_builder(python: &str, wordnet: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let script = Path::new(ROOT).join("models/demo/build_data.py");
    Command::new(python).arg(script).arg("--wordnet").arg(wordnet).arg("--out").arg(out).args(extra).output().unwrap()
}

/// Runs the builder on the fixture; its stderr when it fails (exit code 2, as for all bad input).
fn build(python: &str, out: &Path, extra: &[&str]) -> std::result::Result<(), String> {
    let run = run_builder(python, &fixture(), out, extra);
    if run.status.success() {
        return Ok(());
    }
    assert_eq!(run.status.code(), Some(2), "bad input exits with 2");
    Err(String::from_utf8_lossy(&run.stderr).into_owned())
}

fn lemmas(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["lemma"].as_str().unwrap().to_string())
        .collect()
}

fn load(out: &Path, name: &str) -> Dataset {
    data::load(&out.join(format!("{name}.jsonl")), false).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn builder_rows_load_as_training_data() {
    let Some(python) = python() else { return };
    let out = out_dir("a");
    build(&python, &out, &[]).unwrap();

    // SFT: one- and two-turn conversations in the StableVicuna template, nothing else.
    let sft = load(&out, "sft_train");
    assert!(sft.preferences.is_empty() && sft.plain_prompts.is_empty());
    let rendered: Vec<String> = sft.conversations.iter().map(render).collect();
    let llama = "### Human: What is a llama?\n### Assistant: A llama is a wild or domesticated South American \
                 cud-chewing animal related to camels but smaller and lacking a hump.\n";
    assert!(rendered.iter().any(|r| r == llama), "{rendered:#?}");
    for expected in [
        "### Human: Give a synonym of hour.\n### Assistant: Synonyms of hour include hr and 60 minutes.\n",
        "### Human: Use unravel in a sentence.\n### Assistant: The sweater unraveled.\n",
        // A verb, a noun with "an", a name, an adjective with its (p) marker removed.
        "### Human: What does it mean to upgrade?\n### Assistant: To upgrade means to improve what was old or outdated.\n",
        "### Human: What is an aardvark?\n### Assistant: An aardvark is a nocturnal burrowing mammal of the \
         grasslands of Africa that feeds on termites.\n### Human: What is another word for it?\n### Assistant: \
         Another word for aardvark is ant bear.\n",
        "### Human: Give a synonym of handy.\n### Assistant: A synonym of handy is ready to hand.\n",
    ] {
        assert!(rendered.iter().any(|r| r == expected), "missing {expected:?} in {rendered:#?}");
    }
    assert!(sft.conversations.iter().any(|c| c.turns.len() == 2), "multi-turn follow-ups");
    // "run" is a verb (tagged 29 times) before a noun (7): one meaning per word.
    assert!(rendered.iter().all(|r| !r.contains("score in baseball")), "{rendered:#?}");

    // RM: the true answer chosen over a wrong one, for the same question.
    let rm = load(&out, "rm_train");
    assert!(rm.conversations.is_empty() && !rm.preferences.is_empty());
    for p in &rm.preferences {
        assert_ne!(p.chosen, p.rejected);
        let subject: Vec<&str> = p.chosen.split(' ').take(2).collect();
        assert!(p.rejected.starts_with(&subject.join(" ")), "the same sentence around another text: {p:?}");
    }

    // PPO: plain prompts, which `train ppo` renders as a one-turn question.
    let ppo = load(&out, "ppo_train");
    assert_eq!(ppo.plain_prompts.len(), rm.preferences.len(), "one prompt and one pair per word");
    assert!(ppo.prompts().contains(&"### Human: What is a llama?\n### Assistant:".to_string()), "{:?}", ppo.prompts());

    // The held-out words (seed 0 holds out two of the fixture's 14) are in no training file.
    for set in ["sft", "rm", "ppo"] {
        let (train, heldout) =
            (lemmas(&out.join(format!("{set}_train.jsonl"))), lemmas(&out.join(format!("{set}_heldout.jsonl"))));
        assert!(!heldout.is_empty() && !train.is_empty(), "{set}: {train:?} / {heldout:?}");
        assert!(train.is_disjoint(&heldout), "{set}: {train:?} and {heldout:?} overlap");
        load(&out, &format!("{set}_heldout"));
    }
    assert_eq!(lemmas(&out.join("ppo_heldout.jsonl")), BTreeSet::from(["alpaca".into(), "basically".into()]));
    let notice = std::fs::read_to_string(out.join("LICENSE-WordNet.txt")).unwrap();
    assert!(notice.contains("WordNet 3.0 Copyright 2006 by Princeton University"), "{notice}");
}

#[test]
fn builder_is_deterministic_and_seeded() {
    let Some(python) = python() else { return };
    let (a, b, c) = (out_dir("det-a"), out_dir("det-b"), out_dir("det-c"));
    build(&python, &a, &["--seed", "7"]).unwrap();
    build(&python, &b, &["--seed", "7"]).unwrap();
    build(&python, &c, &["--seed", "8"]).unwrap();
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(format!("{name}.jsonl"))).unwrap();
    let mut differs = false;
    for name in FILES {
        assert_eq!(read(&a, name), read(&b, name), "{name}: same seed, different bytes");
        differs |= read(&a, name) != read(&c, name);
    }
    assert_eq!(std::fs::read(a.join("manifest.json")).unwrap(), std::fs::read(b.join("manifest.json")).unwrap());
    assert!(differs, "another seed must change the order, the split or the choices");
    let leftovers: Vec<_> =
        std::fs::read_dir(&a).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    assert!(leftovers.iter().all(|n| !n.ends_with(".tmp")), "{leftovers:?}");

    // --max-words keeps a prefix of the same seeded order: the small set's words are the big one's first ones.
    let small = out_dir("det-small");
    build(&python, &small, &["--seed", "7", "--max-words", "5"]).unwrap();
    let words = |dir: &Path| {
        let mut all = lemmas(&dir.join("ppo_train.jsonl"));
        all.extend(lemmas(&dir.join("ppo_heldout.jsonl")));
        all
    };
    assert_eq!(words(&small).len(), 5);
    assert!(words(&small).is_subset(&words(&a)));

    // --most-frequent keeps the words the sense-tagged corpus uses most: in the fixture's index
    // files "run" (29 as a verb) and "hour" (3); the next ones have 2.
    let frequent = out_dir("det-frequent");
    build(&python, &frequent, &["--seed", "7", "--most-frequent", "2"]).unwrap();
    assert_eq!(words(&frequent), BTreeSet::from(["hour".to_string(), "run".to_string()]));
    assert!(build(&python, &frequent, &["--most-frequent", "0"])
        .unwrap_err()
        .contains("--most-frequent must be at least 1"));
}

#[test]
fn builder_refuses_bad_input_in_one_line() {
    let Some(python) = python() else { return };
    let out = out_dir("bad");
    let err = run_builder(&python, Path::new("/nonexistent-wordnet"), &out, &[]);
    assert_eq!(err.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(stderr.contains("/nonexistent-wordnet/data.noun not found") && stderr.contains("wordnet-base"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // A data line that is not WordNet's format is named by file and line.
    let broken = out_dir("broken-input");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
    }
    std::fs::write(broken.join("data.adv"), "00003483 02 r zz basically\n").unwrap();
    let run = run_builder(&python, &broken, &out, &[]);
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("data.adv:1: not a WordNet data line"), "{stderr}");
    assert!(build(&python, &out, &["--max-words", "0"]).unwrap_err().contains("--max-words must be at least 1"));
}
