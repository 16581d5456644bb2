//! `normlab norms`: every --norm spec, one line each.

pub fn run() -> normlab::Result<()> {
    for (spec, what) in normlab::nn::norm_spec::CATALOG {
        outln!("{spec:<10} {what}")?;
    }
    outln!("\noptions follow the name after ':' as key=value, comma-separated: bn:momentum=0.01,eps=1e-3")?;
    Ok(())
}
