//! Writing a study's outputs: results.json, results.csv, the SVG plots and report.html (one
//! self-contained file: inline SVG and CSS, no network access).

use std::path::Path;

use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::studies::analysis::{analyze, Analysis};
use crate::studies::StudyResults;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One row per run: seed, status, every label, final metrics (ics: one row per measurement).
pub fn csv(r: &StudyResults) -> String {
    if !r.landscape.is_empty() {
        let mut out =
            String::from("study,norm,seed,diverged,step,loss,loss_min,loss_max,grad_change_min,grad_change_max,beta\n");
        for run in &r.landscape {
            for p in &run.probes {
                out.push_str(&format!(
                    "landscape,{},{},{},{},{},{},{},{},{},{}\n",
                    run.norm,
                    run.seed,
                    run.diverged,
                    p.step,
                    p.loss,
                    p.loss_min,
                    p.loss_max,
                    p.grad_change_min,
                    p.grad_change_max,
                    p.beta
                ));
            }
        }
        return out;
    }
    if !r.ics.is_empty() {
        let mut out = String::from("study,norm,seed,diverged,step,test_accuracy,p15,p50,p85\n");
        for run in &r.ics {
            for p in &run.points {
                out.push_str(&format!(
                    "ics,{},{},{},{},{},{},{},{}\n",
                    run.norm, run.seed, run.diverged, p.step, p.test_accuracy, p.p15, p.p50, p.p85
                ));
            }
        }
        return out;
    }
    let keys: Vec<String> = r
        .runs
        .first()
        .map(|x| x.labels.keys().cloned().collect())
        .unwrap_or_default();
    let mut out = format!(
        "study,seed,status,{},test_accuracy,test_loss,train_accuracy,train_loss,epochs,seconds\n",
        keys.join(",")
    );
    for run in &r.runs {
        let labels: Vec<String> = keys
            .iter()
            .map(|k| run.labels.get(k).cloned().unwrap_or_default())
            .collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{:.2}\n",
            r.study,
            run.seed,
            run.status,
            labels.join(","),
            run.test_accuracy,
            run.test_loss,
            run.train_accuracy,
            run.train_loss,
            run.epochs.len(),
            run.seconds
        ));
    }
    out
}

pub fn html(r: &StudyResults, a: &Analysis) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    h.push_str(&format!("<title>normlab study: {}</title>\n", esc(&a.title)));
    h.push_str(
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}\
         th{background:#eee}td:first-child,th:first-child{text-align:left}.finding{background:#eef6ee;border-left:4px solid #2c2;\
         padding:.6em 1em}.quick{background:#fff4d6;border-left:4px solid #d90;padding:.6em 1em}.claim{background:#f4f4fb;border-left:4px solid #66c;padding:.6em 1em}figure{margin:1.5em 0}\
         figcaption{color:#555;font-size:90%}</style></head><body>\n",
    );
    h.push_str(&format!("<h1>{}</h1>\n", esc(&a.title)));
    h.push_str(&format!(
        "<p>normlab study <code>{}</code>{}, {} seed(s), {} runs, {:.0} s.</p>\n",
        esc(&r.study),
        if r.quick { " (--quick)" } else { "" },
        r.seeds,
        r.runs.len() + r.ics.len() + r.landscape.len(),
        r.seconds
    ));
    if r.quick {
        h.push_str(
            "<p class=\"quick\"><b>Quick run: a smoke test, not evidence.</b> Too few steps and seeds to \
             judge any claim; every verdict below is \"inconclusive (quick run)\". Run without --quick \
             for verdicts.</p>\n",
        );
    }
    if !a.claim.is_empty() {
        h.push_str(&format!("<p class=\"claim\"><b>The claim.</b> {}</p>\n", esc(&a.claim)));
    }
    h.push_str(&format!(
        "<p class=\"finding\"><b>What this run found.</b> {}</p>\n",
        esc(&a.finding)
    ));
    if !a.claims.is_empty() {
        h.push_str(
            "<h3>Claims tested</h3>\n<p>Each claim is a difference between arms taken seed by seed; the \
             verdict comes from its mean and 95% t-interval across seeds: <i>agrees</i> when the interval \
             excludes zero on the claimed side and the mean passes the threshold, <i>disagrees</i> when \
             it excludes zero on the other side or lies within the threshold of zero, else \
             <i>inconclusive</i> (always with fewer than 3 seeds). An equivalence claim agrees when the \
             whole interval lies within ±threshold. A claim whose comparison is only fair under a \
             condition (the arms at matched fit, curves that have flattened) states it; when the run \
             breaks it, the verdict is <i>inconclusive (confounded: …)</i> whatever the interval \
             says.</p>\n<table><tr><th>claim</th><th>metric</th>\
             <th>per seed</th><th>mean</th><th>95% interval</th><th>threshold</th><th>seeds</th>\
             <th>fair only if</th><th>verdict</th></tr>\n",
        );
        for c in &a.claims {
            let per: Vec<String> = c.per_seed.iter().map(|v| format!("{v:.3}")).collect();
            let num = |v: f64, sign: bool| match (v.is_finite(), sign) {
                (false, _) => "—".to_string(),
                (true, true) => format!("{v:+.3}"),
                (true, false) => format!("{v:.3}"),
            };
            let color = match c.verdict.as_str() {
                "agrees" => "#dfd",
                "disagrees" => "#fdd",
                _ => "#eee",
            };
            h.push_str(&format!(
                "<tr><td>{}</td><td style=\"text-align:left\">{}</td><td>{}</td><td>{}</td><td>[{}, {}]</td>\
                 <td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td>\
                 <td style=\"background:{color}\"><b>{}</b></td></tr>\n",
                esc(&c.claim),
                esc(&c.metric),
                per.join(", "),
                num(c.mean_difference, true),
                num(c.interval[0], false),
                num(c.interval[1], false),
                esc(&c.rule()),
                c.seeds,
                match &c.condition {
                    None => "—".to_string(),
                    Some(k) => format!(
                        "{} ({})",
                        esc(&k.requires),
                        if k.broken.is_some() { "broken" } else { "held" }
                    ),
                },
                esc(&c.verdict)
            ));
        }
        h.push_str("</table>\n");
    }
    for p in &a.plots {
        h.push_str(&format!(
            "<figure>{}<figcaption>{}</figcaption></figure>\n",
            p.svg,
            esc(&p.caption)
        ));
    }
    for t in &a.tables {
        h.push_str(&format!("<h3>{}</h3>\n<table><tr>", esc(&t.caption)));
        for c in &t.header {
            h.push_str(&format!("<th>{}</th>", esc(c)));
        }
        h.push_str("</tr>\n");
        for row in &t.rows {
            h.push_str("<tr>");
            for c in row {
                h.push_str(&format!("<td>{}</td>", esc(c)));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>\n");
    }
    h.push_str("<h3>Settings</h3>\n<table>");
    for (k, v) in &r.settings {
        h.push_str(&format!(
            "<tr><th>{}</th><td style=\"text-align:left\">{}</td></tr>",
            esc(k),
            esc(v)
        ));
    }
    h.push_str("</table>\n<p>Per-run numbers: results.json and results.csv beside this file.</p>\n</body></html>\n");
    h
}

/// Writes results.json, results.csv, the plots and report.html into `out`; returns the analysis.
pub fn write_all(r: &StudyResults, out: &Path) -> Result<Analysis> {
    let mut r = r.clone();
    r.claims = analyze(&r)?.claims;
    let json = serde_json::to_vec_pretty(&r).expect("results serialize");
    write_atomic(&out.join("results.json"), &json)?;
    write_outputs(&r, out)
}

fn write_outputs(r: &StudyResults, out: &Path) -> Result<Analysis> {
    write_atomic(&out.join("results.csv"), csv(r).as_bytes())?;
    let a = analyze(r)?;
    for p in &a.plots {
        write_atomic(&out.join(&p.file), p.svg.as_bytes())?;
    }
    write_atomic(&out.join("report.html"), html(r, &a).as_bytes())?;
    Ok(a)
}

/// `normlab report DIR`: rebuilds the CSV, plots and report.html from DIR/results.json.
pub fn rebuild(dir: &Path) -> Result<Analysis> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let r: StudyResults = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{}: not normlab study results ({e})", path.display())))?;
    write_outputs(&r, dir)
}
