//! A bounded pass of each fuzz target on stable Rust: every seed in fuzz/seeds/<target>/ and
//! seeded random mutations of them (bit flips, byte changes, cuts, insertions, splices). The
//! long coverage-guided runs use cargo fuzz (fuzz/README.md); this keeps the targets honest in
//! every `cargo test`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

fn mutate(rng: &mut ChaCha8Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.gen_range(0..seeds.len())].clone();
    for _ in 0..rng.gen_range(1..6) {
        let n = d.len();
        match rng.gen_range(0..6) {
            0 if n > 0 => {
                let i = rng.gen_range(0..n);
                d[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if n > 0 => {
                let i = rng.gen_range(0..n);
                d[i] = [0, 1, 0x7f, 0x80, 0xff, b',', b':', b'9'][rng.gen_range(0..8)];
            }
            2 if n > 0 => d.truncate(rng.gen_range(0..n)),
            3 => {
                let i = rng.gen_range(0..=n);
                d.insert(i, rng.gen());
            }
            4 => {
                let other = &seeds[rng.gen_range(0..seeds.len())];
                let cut = rng.gen_range(0..=other.len());
                d.extend_from_slice(&other[cut..]);
            }
            _ if n >= 4 => {
                // A big-endian or little-endian size field made huge.
                let i = rng.gen_range(0..n - 3);
                d[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, rng.gen()]);
            }
            _ => {}
        }
    }
    d
}

fn pass(target: &str, run: fn(&[u8]), iterations: usize) {
    let seeds = seeds(target);
    for s in &seeds {
        run(s);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    for _ in 0..iterations {
        run(&mutate(&mut rng, &seeds));
    }
}

#[test]
fn idx_reader_survives_mutated_files() {
    pass("idx", normlab::fuzz_targets::idx, 20_000);
}

#[test]
fn checkpoint_loader_survives_mutated_files() {
    pass("checkpoint", normlab::fuzz_targets::checkpoint, 20_000);
}

#[test]
fn spec_parsers_survive_mutated_specs() {
    pass("specs", normlab::fuzz_targets::specs, 20_000);
}

#[test]
fn cifar_reader_survives_mutated_batches() {
    pass("cifar", normlab::fuzz_targets::cifar, 20_000);
}

#[test]
fn image_checks_survive_mutated_images() {
    pass("image", normlab::fuzz_targets::image, 5_000);
}

#[test]
fn run_log_reader_survives_mutated_records() {
    pass("run_log", normlab::fuzz_targets::run_log, 20_000);
}

/// Writes fuzz/seeds/image/tiny.jpg (Python's standard library has no JPEG encoder; the other
/// seeds come from fuzz/make_seeds.py): `cargo test --release --test fuzz_smoke -- --ignored`.
#[test]
#[ignore]
fn write_jpeg_seed() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/image/tiny.jpg");
    image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 40) as u8, (y * 80) as u8, 128]))
        .save(path)
        .unwrap();
}
