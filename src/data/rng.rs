//! A small random number generator whose output is fixed by this file alone.
//!
//! Shuffling and augmentation must be the same function of `(seed, epoch, batch)` in every
//! build, so a run resumed by a later binary replays exactly the batches the first one would
//! have seen. `rand`'s `StdRng` and `random_range` are documented as free to change between
//! versions, so the data layer uses this instead: SplitMix64 to hash the key words into a
//! seed, xoshiro256++ for the stream, and Lemire's unbiased bounded integers.

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++ seeded from a list of key words.
pub(crate) struct StableRng {
    s: [u64; 4],
}

impl StableRng {
    /// A generator determined by `key` (e.g. `[seed, STREAM, epoch, batch]`).
    pub(crate) fn from_key(key: &[u64]) -> Self {
        let mut h = 0x6A09_E667_F3BC_C908u64 ^ key.len() as u64;
        for &k in key {
            h = mix64(h.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ k);
        }
        // SplitMix64 stream from h fills the state (never all zero in practice; guarded anyway).
        let mut x = h;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *v = mix64(x);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        StableRng { s }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (`n > 0`), without bias (Lemire's method).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// A fair coin.
    pub(crate) fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// A uniformly random permutation of `0..n` determined by `key` (Fisher-Yates).
pub(crate) fn permutation(n: usize, key: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StableRng::from_key(key);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}
