//! ONNX export: a trained model as a file that ONNX Runtime (or any ONNX runtime) runs with
//! the same logits. Each layer appends its own eval-mode nodes (`Layer::export_onnx`); this
//! module adds the input normalization in front, the model's metadata, and checks the file by
//! parsing it back.
//!
//! Opset 21 (IR version 10): the first opset whose GroupNormalization takes a per-channel
//! scale and bias as PyTorch's GroupNorm does (opset 18's were per group); LayerNormalization
//! is there from opset 17, BatchNormalization and InstanceNormalization from the start.

use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{
    GraphProto, Message, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

use crate::checkpoint::CheckpointMeta;
use crate::error::{Error, Result};
use crate::models::Model;
use crate::onnx::graph::OnnxGraph;

pub const OPSET: i64 = 21;
pub const IR_VERSION: i64 = 10;
/// The graph's input: raw pixels scaled to [0, 1], [N, C, H, W] with a dynamic N.
pub const INPUT: &str = "image";
pub const OUTPUT: &str = "logits";

/// An exported model: the file's bytes and what they hold.
pub struct Exported {
    pub bytes: Vec<u8>,
    pub nodes: usize,
    pub initializers: usize,
}

/// The ONNX model of `model` in eval mode. `folded` only goes into the metadata.
pub fn export(model: &Model, meta: &CheckpointMeta, folded: bool) -> Result<Exported> {
    let mut g = OnnxGraph::default();
    g.input(INPUT, 4);
    // The training normalization as the graph's first nodes: x ↦ (x − mean) / std.
    let norm = meta.input_norm;
    let per_channel = [norm.channels, 1, 1];
    let mean = g.constant("input_mean", &per_channel, norm.means())?;
    let std = g.constant("input_std", &per_channel, norm.stds())?;
    let centred = g.node("Sub", &[INPUT, &mean], &[], 4);
    let mut x = g.node("Div", &[&centred, &std], &[], 4);
    for (name, layer) in &model.net.layers {
        x = layer.export_onnx(&mut g, &x, name)?;
    }
    // A fixed output name, whatever the last layer produced.
    let logits_rank = g.rank(&x)?;
    if logits_rank != 2 {
        return Err(Error::invalid(format!(
            "ONNX export: the model's output has rank {logits_rank}, expected [N, classes]"
        )));
    }
    if g.nodes.last().map(|n| n.output[0] != x).unwrap_or(true) {
        g.node("Identity", &[&x], &[], 2);
    }
    if let Some(last) = g.nodes.last_mut() {
        last.output = vec![OUTPUT.to_string()];
    }

    let [c, h, w] = model.spec.input;
    let mut graph = GraphProto::new();
    graph.name = format!("normlab {} {}", model.spec.model, model.spec.norm);
    graph.input = vec![value_info(INPUT, &[None, Some(c), Some(h), Some(w)])];
    graph.output = vec![value_info(OUTPUT, &[None, Some(model.spec.classes)])];
    let (nodes, initializers) = (g.nodes.len(), g.initializers.len());
    graph.node = g.nodes;
    graph.initializer = g.initializers;

    let mut m = ModelProto::new();
    m.ir_version = IR_VERSION;
    m.producer_name = "normlab".into();
    m.producer_version = env!("CARGO_PKG_VERSION").into();
    let mut opset = OperatorSetIdProto::new();
    opset.version = OPSET;
    m.opset_import = vec![opset];
    m.doc_string = format!(
        "{} with {}; input '{INPUT}': pixels scaled to [0, 1], [N, {c}, {h}, {w}]; the graph normalizes them \
         with the training set's per-channel mean {:?} and std {:?} first; output '{OUTPUT}': [N, {}]",
        model.spec.model,
        model.spec.norm,
        norm.means(),
        norm.stds(),
        model.spec.classes
    );
    let props = [
        ("normlab.model", model.spec.model.to_string()),
        ("normlab.norm", model.spec.norm.to_string()),
        ("normlab.epoch", meta.epoch.to_string()),
        ("normlab.folded", folded.to_string()),
        (
            "normlab.input",
            format!("pixels scaled to [0, 1], shape [N, {c}, {h}, {w}]"),
        ),
        (
            "normlab.input_norm",
            serde_json::to_string(&norm).expect("norm serializes"),
        ),
    ];
    m.metadata_props = props
        .into_iter()
        .map(|(k, v)| {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            e
        })
        .collect();
    m.graph = Some(graph).into();
    let bytes = m
        .write_to_bytes()
        .map_err(|e| Error::invalid(format!("ONNX export: encoding failed: {e}")))?;
    check_parses(&bytes, nodes, initializers)?;
    Ok(Exported {
        bytes,
        nodes,
        initializers,
    })
}

/// Reads the encoded model back and checks that it holds what was written.
pub fn check_parses(bytes: &[u8], nodes: usize, initializers: usize) -> Result<()> {
    let back = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| Error::invalid(format!("ONNX export: the written model does not parse back: {e}")))?;
    let g = back.graph.as_ref();
    let ok = back.ir_version == IR_VERSION
        && back.opset_import.first().map(|o| o.version) == Some(OPSET)
        && g.is_some_and(|g| g.node.len() == nodes && g.initializer.len() == initializers);
    if !ok {
        return Err(Error::invalid(
            "ONNX export: the model read back differs from the one written",
        ));
    }
    Ok(())
}

/// A float tensor's name, element type and shape (None: the dynamic batch dimension "N").
fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.dim = dims
        .iter()
        .map(|d| {
            let mut dim = Dimension::new();
            dim.value = Some(match d {
                Some(v) => dimension::Value::DimValue(*v as i64),
                None => dimension::Value::DimParam("N".into()),
            });
            dim
        })
        .collect();
    let mut t = type_proto::Tensor::new();
    t.elem_type = DataType::FLOAT as i32;
    t.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(Value::TensorType(t));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}
