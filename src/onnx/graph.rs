//! A small builder for ONNX graphs: nodes, initializers and the rank of every value (a layer
//! needs the rank to know whether to flatten before a Gemm). The protobuf messages come from
//! the onnx-protobuf crate; nothing here encodes wire bytes by hand.

use std::collections::HashMap;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{AttributeProto, NodeProto, TensorProto};

use crate::error::{Error, Result};

/// One node attribute.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

#[derive(Default)]
pub struct OnnxGraph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    ranks: HashMap<String, usize>,
    counter: usize,
}

impl OnnxGraph {
    /// Declares a graph input of the given rank.
    pub fn input(&mut self, name: &str, rank: usize) {
        self.ranks.insert(name.to_string(), rank);
    }

    /// The rank of a value produced so far.
    pub fn rank(&self, name: &str) -> Result<usize> {
        self.ranks
            .get(name)
            .copied()
            .ok_or_else(|| Error::invalid(format!("ONNX export: no value named '{name}' in the graph")))
    }

    /// A float32 initializer (weights, statistics, constants); returns its name.
    pub fn constant(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<String> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::invalid(format!(
                "ONNX export: {name} has {} values for shape {shape:?}",
                data.len()
            )));
        }
        let name = self.unique(name);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::FLOAT as i32;
        t.dims = shape.iter().map(|&d| d as i64).collect();
        t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        self.ranks.insert(name.clone(), shape.len());
        Ok(name)
    }

    /// An int64 initializer (axes, shapes).
    pub fn constant_i64(&mut self, name: &str, data: &[i64]) -> String {
        let name = self.unique(name);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::INT64 as i32;
        t.dims = vec![data.len() as i64];
        t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        self.ranks.insert(name.clone(), 1);
        name
    }

    /// Appends `op(inputs)` with one output of rank `out_rank`; returns the output's name. An
    /// empty input name is an omitted optional input.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], out_rank: usize) -> String {
        self.node_outputs(op, inputs, attrs, &[out_rank]).remove(0)
    }

    /// As `node`, for an operator with several outputs (LSTM's Y and Y_h), one rank each.
    pub fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        out_ranks: &[usize],
    ) -> Vec<String> {
        let outs: Vec<String> = out_ranks
            .iter()
            .map(|&rank| {
                let name = self.unique(&op.to_lowercase());
                self.ranks.insert(name.clone(), rank);
                name
            })
            .collect();
        let mut n = NodeProto::new();
        n.op_type = op.to_string();
        n.name = format!("{op}_{}", self.nodes.len());
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = outs.clone();
        n.attribute = attrs.iter().map(|(k, v)| attribute(k, v)).collect();
        self.nodes.push(n);
        outs
    }

    /// A name not used before in this graph, from `hint`.
    fn unique(&mut self, hint: &str) -> String {
        if !self.ranks.contains_key(hint) && !hint.is_empty() {
            return hint.to_string();
        }
        loop {
            self.counter += 1;
            let name = format!("{hint}_{}", self.counter);
            if !self.ranks.contains_key(&name) {
                return name;
            }
        }
    }
}

fn attribute(name: &str, value: &Attr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.to_string();
    match value {
        Attr::Int(i) => {
            a.type_ = AttributeType::INT.into();
            a.i = *i;
        }
        Attr::Ints(v) => {
            a.type_ = AttributeType::INTS.into();
            a.ints = v.clone();
        }
        Attr::Float(f) => {
            a.type_ = AttributeType::FLOAT.into();
            a.f = *f;
        }
    }
    a
}

/// A Relu after `y` when a ReLU is fused into the layer that produced it.
pub fn relu_if(g: &mut OnnxGraph, y: String, relu: bool) -> String {
    if !relu {
        return y;
    }
    let rank = g.rank(&y).unwrap_or(4);
    g.node("Relu", &[&y], &[], rank)
}

/// The shape [C, 1, ..] that broadcasts a per-channel vector over a value of `rank` (channels
/// on axis 1).
pub fn channel_shape(c: usize, rank: usize) -> Vec<usize> {
    let mut shape = vec![c];
    shape.resize(rank.saturating_sub(1).max(1), 1);
    shape
}
