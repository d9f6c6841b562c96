//! The `featreplay` binary end to end: listing devices, the demo job learning, and bad input
//! ending in a one-line error with a non-zero exit (never a panic).

use std::process::Command;

fn featreplay(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_featreplay")).args(args).output().expect("run featreplay")
}

#[test]
fn devices_lists_adapters() {
    let out = featreplay(&["devices"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("[0] "), "{stdout}");
    assert!(stdout.contains("default: [0]"), "{stdout}");
}

#[test]
fn demo_loss_falls() {
    let out = featreplay(&[
        "demo",
        "--epochs",
        "6",
        "--samples",
        "64",
        "--batch-size",
        "16",
        "--size",
        "8",
        "--width",
        "4",
        "--lr",
        "0.1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let losses: Vec<f32> = stdout
        .lines()
        .filter(|l| l.starts_with("epoch"))
        .map(|l| l.split_whitespace().nth(3).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 6, "{stdout}");
    assert!(losses.iter().all(|l| l.is_finite()));
    // Random labels over 10 classes start near ln(10) = 2.30; memorising 64 images lowers it.
    assert!(losses[0] > 1.5 && losses[0] < 4.0, "first epoch loss {}", losses[0]);
    assert!(losses[5] < 0.8 * losses[0], "loss did not fall: {losses:?}");
}

#[test]
fn bad_input_is_a_one_line_error() {
    for (args, expect) in [
        (vec!["demo", "--device", "99"], "no adapter matches '99'"),
        (vec!["demo", "--device", "type:tpu"], "invalid adapter selector"),
        (vec!["demo", "--conv-variant", "winograd"], "unknown kernel variant 'winograd'"),
        (vec!["demo", "--batch-size", "0"], "need batch >= 1"),
        (vec!["demo", "--width", "3"], "even width"),
    ] {
        let out = featreplay(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("featreplay: error: "), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn profile_reports_a_steady_iteration_and_writes_json() {
    let dir = std::env::temp_dir().join(format!("featreplay-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("p.json");
    let out = featreplay(&[
        "profile",
        "--depth",
        "8",
        "--batch-size",
        "16",
        "--warmup",
        "2",
        "--iterations",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for row in
        ["| dispatches |", "| host waits | 1 |", "| buffers created | 0 |", "Device time by layer type", "| conv |"]
    {
        assert!(stdout.contains(row), "no '{row}' in:\n{stdout}");
    }
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let c = &p["per_iteration"];
    assert_eq!(c["buffers_created"], 0, "{c}");
    assert_eq!(c["bind_groups_created"], 0, "{c}");
    assert_eq!(c["host_waits"], 1, "{c}");
    assert!(c["dispatches"].as_u64().unwrap() > 10);
    assert!(p["ops"].as_array().unwrap().iter().any(|o| o["layer"] == "sgd" && o["calls_per_iteration"] == 1.0));
    std::fs::remove_dir_all(&dir).ok();

    // A bad --json is refused before any work.
    let out = featreplay(&["profile", "--json", "/nonexistent-dir/p.json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not exist"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
