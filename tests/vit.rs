//! The ViT through the CLI: every block norm and both placements train and resume exactly, the
//! checkpoint loads into timm's VisionTransformer strictly with the same predictions (where the
//! venv has timm), and bad specs get one clear line.

mod common;

use std::path::Path;

use common::cli::*;

#[test]
fn every_block_norm_and_placement_trains_and_resumes_exactly() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 20, false);
    for (model, norm) in [
        ("vit:16,2,2,7", "layernorm:eps=1e-6"),
        ("vit:16,2,2,7,2,post", "layernorm:eps=1e-6"),
        ("vit:16,1,4,7", "rms"),
        ("vit:16,1,2,14", "bn"),
        ("vit:16,1,2,7,1,post", "none"),
    ] {
        let name = format!("{model}-{norm}").replace([':', ',', '='], "_");
        let whole = resumes_exactly(
            &t,
            &data,
            &name,
            &["--model", model, "--norm", norm, "--optimizer", "adamw"],
        );
        let names: Vec<String> = tensors(&whole.join("model.safetensors"))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for key in [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.0.attn.qkv.weight",
            "head.weight",
        ] {
            assert!(
                names.contains(&key.to_string()),
                "{model}: {key} missing from {names:?}"
            );
        }
        let ckpt = whole.join("model.safetensors");
        ok(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)]);
    }
}

#[test]
fn a_fresh_vit_defaults_to_timms_layer_norm() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 32, 10, false);
    let run = train_batch16(&t, &data, "default", &["--model", "vit:8,1,2,7", "--epochs", "1"]);
    let names: Vec<String> = tensors(&run.join("model.safetensors"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"blocks.0.norm1.bias".to_string()), "{names:?}");
    let meta = std::fs::read(run.join("model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&meta[..meta.len().min(4096)]).to_string();
    assert!(header.contains("layernorm:eps=0.000001"), "{header}");
}

#[test]
fn timm_loads_the_checkpoint_strictly_and_predicts_the_same() {
    let Some(python) = venv_python("timm, safetensors") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 40, false);
    for norm in ["layernorm:eps=1e-6", "rms"] {
        let run = train_batch16(
            &t,
            &data,
            norm.split(':').next().unwrap(),
            &["--model", "vit:16,2,2,7", "--norm", norm, "--epochs", "1"],
        );
        let out = std::process::Command::new(&python)
            .arg(root.join("scripts/check_timm_vit.py"))
            .arg(run.join("model.safetensors"))
            .arg(&data)
            .env("NORMLAB", env!("CARGO_BIN_EXE_normlab"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{norm}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("40 test images: 0 predicted classes differ"),
            "{stdout}"
        );
    }
}

#[test]
fn bad_vit_specs_get_one_clear_line_and_write_nothing() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 20, 10, false);
    let out = t.path().join("never");
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--data", s(&data), "--out", s(&out), "--epochs", "1"];
        args.extend_from_slice(extra);
        fails(&args)
    };
    for (model, says) in [
        ("vit:30,2,4,7", "not divisible by its 4 heads"),
        ("vit:32,2,4,5", "does not divide the 28x28 images"),
        ("vit:0,2,2,7", "width D '0'"),
        ("vit:32,0,2,7", "block count L '0'"),
        ("vit:99999,2,2,7", "width D '99999'"),
        ("vit:32,2,2,7,4,sideways", "vit takes vit:D,L,H,P"),
    ] {
        let err = run(&["--model", model]);
        assert!(err.contains(says), "{model}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{model}: {err}");
    }
    for norm in ["gn:2", "ln", "in", "bn-noisy"] {
        let err = run(&["--model", "vit:16,1,2,7", "--norm", norm]);
        assert!(err.contains("vit's blocks take"), "{norm}: {err}");
    }
    let err = run(&["--model", "vit:16,1,2,7", "--norm", "rms:eps=0"]);
    assert!(err.contains("eps"), "{err}");
    assert!(!out.exists());
}
