//! A chain of layer ranges returns exactly the whole model's output (MiniLM-L6, int8 weights;
//! fetched by `scripts/fetch_minilm.py`, which `.ci/run` runs).

use osprey_engine::split::{RangeInput, SplitGraph, pool};
use osprey_engine::text::TextEncoder;
use std::path::PathBuf;

fn minilm() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/minilm")
}

fn boundaries() -> Vec<String> {
    let mut b = vec!["node_layer_norm".to_string()];
    b.extend((1..=6).map(|i| format!("node_layer_norm_{}", 2 * i)));
    b
}

#[test]
fn a_chain_of_ranges_equals_the_whole_model_on_the_held_out_sentences() {
    let dir = minilm();
    let path = dir.join("model.onnx");
    assert!(path.exists(), "{} is missing: run scripts/fetch_minilm.py", path.display());
    let seq = 32;
    let graph = SplitGraph::open(&path, &boundaries(), seq, 384).unwrap();
    assert_eq!(graph.units(), 7);
    let whole = graph.range(0..7).unwrap();
    let cuts = [0..2, 2..5, 5..7];
    let chain: Vec<_> = cuts.iter().map(|r| graph.range(r.clone()).unwrap()).collect();
    let encoder = TextEncoder::load(&dir.join("tokenizer.json"), seq).unwrap();
    let text = std::fs::read_to_string(dir.join("eval/sentences.txt")).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let e = encoder.encode(line).unwrap();
        assert_eq!(e.ids[0], 101, "[CLS] first");
        let expect = whole.run(RangeInput::Tokens { ids: &e.ids, mask: &e.mask }).unwrap();
        let mut h = chain[0].run(RangeInput::Tokens { ids: &e.ids, mask: &e.mask }).unwrap();
        for r in &chain[1..] {
            h = r.run(RangeInput::Hidden { hidden: &h, mask: &e.mask }).unwrap();
        }
        assert_eq!(h, expect, "split output differs from the whole model on {line:?}");
        let emb = pool(&h, &e.mask, 384);
        let norm: f32 = emb.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        n += 1;
    }
    assert!(n >= 20);
    // The wrong kind of input is refused, not run.
    let e = encoder.encode("x").unwrap();
    assert!(chain[1].run(RangeInput::Tokens { ids: &e.ids, mask: &e.mask }).is_err());
    assert!(chain[1].run(RangeInput::Hidden { hidden: &[0.0; 3], mask: &e.mask }).is_err());
}

#[test]
fn similar_sentences_embed_closer_than_unrelated_ones() {
    let dir = minilm();
    let graph = SplitGraph::open(&dir.join("model.onnx"), &boundaries(), 32, 384).unwrap();
    let whole = graph.range(0..7).unwrap();
    let encoder = TextEncoder::load(&dir.join("tokenizer.json"), 32).unwrap();
    let embed = |s: &str| {
        let e = encoder.encode(s).unwrap();
        pool(&whole.run(RangeInput::Tokens { ids: &e.ids, mask: &e.mask }).unwrap(), &e.mask, 384)
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let a = embed("Smoke was detected near the electrical cabinet.");
    let b = embed("There is smoke by the power cabinet.");
    let c = embed("The quality check rejected nine bottles.");
    assert!(dot(&a, &b) > dot(&a, &c) + 0.2, "{} vs {}", dot(&a, &b), dot(&a, &c));
}
