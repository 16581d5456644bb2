//! What a run logs beyond its per-epoch metrics: one row per optimizer step (loss, learning
//! rate, images/s) and, with `--tensorboard`, each norm layer's |γ| at the end of every epoch
//! (network slimming's signal). Both live in the commit record as tensors (`log.steps`,
//! `log.gamma.<epoch>.<layer>`), so `steps.csv` and the TensorBoard event file are views that
//! every commit and every resume rewrite whole: a kill at any instant loses nothing committed
//! and leaves no row of an epoch that will be trained again.

use std::path::Path;

use protobuf2::Message;
use safetensors::{Dtype, SafeTensors};
use tensorboard_proto::event::Event;
use tensorboard_proto::summary::{HistogramProto, Summary, Summary_Value};

use super::RunMetrics;
use crate::checkpoint::Entry;
use crate::error::{Error, Result};

/// The event file TensorBoard reads (it looks for "tfevents" in the name).
pub const EVENTS_FILE: &str = "events.out.tfevents.normlab";
const STEP_COLUMNS: usize = 8;
/// Records written before the loader's columns had six.
const OLD_STEP_COLUMNS: usize = 6;
const HISTOGRAM_BUCKETS: usize = 30;

#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    /// 1-based optimizer step over the whole run.
    pub step: u64,
    /// 1-based epoch.
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub images_per_sec: f64,
    /// Seconds since the Unix epoch when the step ended.
    pub wall_time: f64,
    /// Seconds the step waited for its batch (a streamed split whose decoding fell behind).
    pub data_wait: f64,
    /// A streamed split: what the decode threads can deliver so far in the epoch (images per
    /// second of decoding, times the threads); 0 in memory.
    pub loader_images_per_sec: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunLog {
    pub steps: Vec<StepRow>,
    /// (1-based epoch, layer name, |γ| of its channels).
    pub gammas: Vec<(usize, String, Vec<f32>)>,
}

impl RunLog {
    /// The log as commit-record tensors.
    pub fn entries(&self) -> Vec<Entry> {
        let mut flat = Vec::with_capacity(self.steps.len() * STEP_COLUMNS);
        for r in &self.steps {
            flat.extend([
                r.step as f64,
                r.epoch as f64,
                r.loss,
                r.lr,
                r.images_per_sec,
                r.wall_time,
                r.data_wait,
                r.loader_images_per_sec,
            ]);
        }
        let mut out = vec![Entry {
            name: "log.steps".into(),
            dtype: Dtype::F64,
            shape: vec![self.steps.len(), STEP_COLUMNS],
            bytes: flat.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }];
        for (epoch, layer, g) in &self.gammas {
            out.push(Entry::f32(format!("log.gamma.{epoch}.{layer}"), &[g.len()], g));
        }
        out
    }

    /// The log of a commit record holding `epochs` epochs (empty for records written before
    /// logs existed); rows of later epochs cannot be there, and are refused if they are.
    pub fn from_record(path: &Path, st: &SafeTensors, epochs: usize) -> Result<RunLog> {
        let mut log = RunLog::default();
        let bad = |m: String| Error::checkpoint(path, m);
        if let Ok(t) = st.tensor("log.steps") {
            let columns = t.shape().get(1).copied().unwrap_or(0);
            if t.dtype() != Dtype::F64 || t.shape().len() != 2 || ![STEP_COLUMNS, OLD_STEP_COLUMNS].contains(&columns) {
                return Err(bad(format!(
                    "log.steps is {:?} {:?}, expected F64 [N, {STEP_COLUMNS}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            let values: Vec<f64> = t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            for row in values.chunks_exact(columns) {
                let epoch = row[1] as usize;
                if !(1..=epochs).contains(&epoch) || row[0].is_nan() || row[0] < 1.0 {
                    return Err(bad(format!("log.steps has a row of epoch {} step {}", row[1], row[0])));
                }
                log.steps.push(StepRow {
                    step: row[0] as u64,
                    epoch,
                    loss: row[2],
                    lr: row[3],
                    images_per_sec: row[4],
                    wall_time: row[5],
                    data_wait: row.get(6).copied().unwrap_or(0.0),
                    loader_images_per_sec: row.get(7).copied().unwrap_or(0.0),
                });
            }
        }
        for (name, t) in st.tensors() {
            let Some(rest) = name.strip_prefix("log.gamma.") else {
                continue;
            };
            let (epoch, layer) = rest
                .split_once('.')
                .ok_or_else(|| bad(format!("bad log tensor name {name}")))?;
            let epoch: usize = epoch.parse().map_err(|_| bad(format!("bad log tensor name {name}")))?;
            if t.dtype() != Dtype::F32 || !(1..=epochs).contains(&epoch) {
                return Err(bad(format!("bad log tensor {name}")));
            }
            log.gammas
                .push((epoch, layer.to_string(), crate::checkpoint::le_f32s(t.data()).collect()));
        }
        log.gammas.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(log)
    }

    /// steps.csv: one row per optimizer step.
    pub fn steps_csv(&self) -> String {
        let mut s = String::from("step,epoch,loss,lr,images_per_sec,wall_time,data_wait_s,loader_images_per_sec\n");
        for r in &self.steps {
            s.push_str(&format!(
                "{},{},{},{},{:.1},{:.3},{:.6},{:.1}\n",
                r.step, r.epoch, r.loss, r.lr, r.images_per_sec, r.wall_time, r.data_wait, r.loader_images_per_sec
            ));
        }
        s
    }

    /// The whole TensorBoard event file: per step train/loss, train/lr, train/images_per_sec,
    /// train/data_wait_seconds, train/loader_images_per_sec; per epoch (step = epoch) epoch/{train,test}_{loss,accuracy},
    /// epoch/data_wait_seconds, epoch/loader_images_per_sec and a histogram of |γ| per
    /// norm layer (gamma_abs/<layer>).
    pub fn tensorboard_events(&self, metrics: &RunMetrics) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let start = self.steps.first().map_or(0.0, |r| r.wall_time);
        let mut first = Event::new();
        first.set_wall_time(start);
        first.set_file_version("brain.Event:2".into());
        write_record(&mut out, &first)?;
        for r in &self.steps {
            for (tag, v) in [
                ("train/loss", r.loss),
                ("train/lr", r.lr),
                ("train/images_per_sec", r.images_per_sec),
                ("train/data_wait_seconds", r.data_wait),
                ("train/loader_images_per_sec", r.loader_images_per_sec),
            ] {
                write_record(
                    &mut out,
                    &event(r.wall_time, r.step as i64, tag, Value::Scalar(v as f32)),
                )?;
            }
        }
        for e in &metrics.epochs {
            let wall = self
                .steps
                .iter()
                .rev()
                .find(|r| r.epoch == e.epoch)
                .map_or(start, |r| r.wall_time);
            for (tag, v) in [
                ("epoch/train_loss", e.train_loss),
                ("epoch/train_accuracy", e.train_accuracy),
                ("epoch/test_loss", e.test_loss),
                ("epoch/test_accuracy", e.test_accuracy),
                ("epoch/data_wait_seconds", e.data_wait_seconds),
                ("epoch/loader_images_per_sec", e.loader_images_per_sec),
            ] {
                write_record(&mut out, &event(wall, e.epoch as i64, tag, Value::Scalar(v as f32)))?;
            }
            for (_, layer, g) in self.gammas.iter().filter(|(k, _, _)| *k == e.epoch) {
                let tag = format!("gamma_abs/{layer}");
                write_record(
                    &mut out,
                    &event(wall, e.epoch as i64, &tag, Value::Histogram(histogram(g))),
                )?;
            }
        }
        Ok(out)
    }
}

enum Value {
    Scalar(f32),
    Histogram(HistogramProto),
}

fn event(wall_time: f64, step: i64, tag: &str, value: Value) -> Event {
    let mut v = Summary_Value::new();
    v.set_tag(tag.to_string());
    match value {
        Value::Scalar(x) => v.set_simple_value(x),
        Value::Histogram(h) => v.set_histo(h),
    }
    let mut summary = Summary::new();
    summary.set_value(vec![v].into());
    let mut e = Event::new();
    e.set_wall_time(wall_time);
    e.set_step(step);
    e.set_summary(summary);
    e
}

/// Equal-width buckets between the smallest and largest value (bucket_limit: right edges).
fn histogram(values: &[f32]) -> HistogramProto {
    let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (lo, hi) = if v.is_empty() { (0.0, 0.0) } else { (lo, hi) };
    let width = ((hi - lo) / HISTOGRAM_BUCKETS as f64).max(1e-12);
    let mut counts = vec![0.0; HISTOGRAM_BUCKETS];
    for &x in &v {
        counts[(((x - lo) / width) as usize).min(HISTOGRAM_BUCKETS - 1)] += 1.0;
    }
    let mut h = HistogramProto::new();
    h.set_min(lo);
    h.set_max(hi);
    h.set_num(v.len() as f64);
    h.set_sum(v.iter().sum());
    h.set_sum_squares(v.iter().map(|x| x * x).sum());
    h.set_bucket_limit((1..=HISTOGRAM_BUCKETS).map(|k| lo + width * k as f64).collect());
    h.set_bucket(counts);
    h
}

// TFRecord framing: length (u64 LE), masked CRC-32C of the length, the record, masked CRC-32C
// of the record.
fn write_record(out: &mut Vec<u8>, e: &Event) -> Result<()> {
    let data = e
        .write_to_bytes()
        .map_err(|err| Error::invalid(format!("TensorBoard event encoding failed: {err}")))?;
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
    Ok(())
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C's check value, then TensorFlow's mask: rotate right by 15, add a constant.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        // 0xe3069283 rotated right by 15 bits is 0x2507c60d.
        assert_eq!(masked_crc(b"123456789"), 0x2507_c60d_u32.wrapping_add(0xa282_ead8));
    }

    #[test]
    fn histogram_counts_every_value_once() {
        let h = histogram(&[0.0, 0.5, 1.0, 1.0, 0.25]);
        assert_eq!(h.get_num(), 5.0);
        assert_eq!(h.get_bucket().iter().sum::<f64>(), 5.0);
        assert_eq!(h.get_bucket()[HISTOGRAM_BUCKETS - 1], 2.0);
        assert!((h.get_bucket_limit()[HISTOGRAM_BUCKETS - 1] - 1.0).abs() < 1e-12);
    }
}
