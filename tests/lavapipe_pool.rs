//! The size of llvmpipe's thread pool that `open_devices` gives each device on a CPU adapter.
//! A test binary of its own: it sets `LP_NUM_THREADS`, which no other test may race with.

use featreplay::train::run::{lavapipe_threads, open_devices, LAVAPIPE_THREADS_PER_CORE};

#[test]
fn lavapipe_pool_is_two_threads_per_core_alone_and_a_share_when_shared() {
    // A device alone on a 2-core machine: two threads per core, unless the user chose.
    assert_eq!(LAVAPIPE_THREADS_PER_CORE, 2);
    assert_eq!(lavapipe_threads(2, 1, false), Some(4));
    assert_eq!(lavapipe_threads(16, 1, false), Some(32));
    assert_eq!(lavapipe_threads(2, 1, true), None);
    // One core: llvmpipe's default (no pool to balance).
    assert_eq!(lavapipe_threads(1, 1, false), None);
    // Stages (or processes) share the cores equally, even over the user's setting.
    assert_eq!(lavapipe_threads(2, 2, false), Some(1));
    assert_eq!(lavapipe_threads(2, 2, true), Some(1));
    assert_eq!(lavapipe_threads(16, 4, false), Some(4));
    assert_eq!(lavapipe_threads(2, 3, false), Some(1));
}

#[test]
fn each_call_sets_the_pool_for_its_own_stage_count() {
    let user = std::env::var("LP_NUM_THREADS").ok();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let pool = || std::env::var("LP_NUM_THREADS").ok();
    let auto = ["auto".to_string()];
    let one = open_devices(&auto, 1).unwrap();
    if !one[0].adapter().is_lavapipe() {
        // Any other adapter (a GPU): the variable is left as the user set it, or unset.
        drop(one);
        let two = open_devices(&auto, 2).unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(pool(), user);
        return;
    }
    let alone = match &user {
        Some(u) => Some(u.clone()),
        None if cores > 1 => Some((cores * LAVAPIPE_THREADS_PER_CORE).to_string()),
        None => None,
    };
    assert_eq!(pool(), alone);
    drop(one);
    // Two stages: an equal share each, whatever the user set.
    let two = open_devices(&auto, 2).unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(pool(), Some((cores / 2).max(1).to_string()));
    drop(two);
    // One device again (as `compare` opens K = 1 after K = 2): not the stages' share left over.
    let again = open_devices(&auto, 1).unwrap();
    assert_eq!(pool(), alone);
    // The device works with that pool.
    let x = again[0].tensor(&[4], &[1.0, -2.0, 3.0, -4.0]).unwrap();
    assert_eq!(x.to_vec().unwrap(), vec![1.0, -2.0, 3.0, -4.0]);
}
