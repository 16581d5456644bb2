use rayon::prelude::*;
use std::time::Instant;
fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        for mb in [3.3f64, 6.3, 12.6, 64.0] {
            let n = (mb * 1e6 / 4.0) as usize;
            let a = vec![1.0f32; n];
            let mut b = vec![0.0f32; n];
            let mut s = vec![0.0f32; n];
            let mut ts = vec![];
            let mut tr = vec![];
            let mut t3 = vec![];
            for _ in 0..200 {
                let t = Instant::now();
                b.par_chunks_mut(n / 2 + 1)
                    .zip(a.par_chunks(n / 2 + 1))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                ts.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let sum: f32 = a.par_chunks(n / 2 + 1).map(|c| c.iter().sum::<f32>()).sum();
                std::hint::black_box(sum);
                tr.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                s.par_chunks_mut(n / 2 + 1)
                    .zip(a.par_chunks(n / 2 + 1))
                    .zip(b.par_chunks(n / 2 + 1))
                    .for_each(|((d, x), y)| {
                        for i in 0..d.len() {
                            d[i] = x[i] * y[i] + 1.0;
                        }
                    });
                t3.push(t.elapsed().as_secs_f64());
            }
            let bytes = n as f64 * 4.0;
            println!(
                "{mb} MB: copy {:.1} GB/s (r+w), read {:.1} GB/s, 2 reads+1 write {:.1} GB/s",
                2.0 * bytes / med(ts) / 1e9,
                bytes / med(tr) / 1e9,
                3.0 * bytes / med(t3) / 1e9
            );
        }
    });
}
