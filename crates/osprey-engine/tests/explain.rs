//! Occlusion explanations on the bundled models, against cases whose answer is known: masking
//! the part of a clip where the word is spoken changes the answer, masking the quiet part
//! around it does not, and the attribution ranks them so.

use osprey_core::model::ModelSpec;
use osprey_core::tensor::{DataType, RawTensor};
use osprey_engine::Session;
use osprey_engine::explain::{explain, occlude};
use std::path::Path;

fn model(name: &str) -> ModelSpec {
    ModelSpec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name))
        .expect("bundled model")
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0)
}

#[test]
fn masking_the_spoken_word_changes_the_answer_and_masking_silence_does_not() {
    let m = model("spoken_digits");
    let x = m.explain.clone().expect("spoken_digits declares [explain]");
    let patches = x.patches();
    let eval = m.load_eval().unwrap().expect("an eval set");
    let s = Session::load(&m, m.variant("large").unwrap()).unwrap();
    // A clean case: a clip from a quiet room (difficulty grade 0) the model gets right with
    // high confidence whose energy is concentrated (the loud half of its segments hold at
    // least 20x the energy of the quiet half).
    let seg = 6400 / patches;
    let mut checked = 0;
    let grades = eval.severity.clone().expect("graded clips");
    for i in (0..eval.len()).filter(|&i| grades[i] == 0) {
        let bytes = eval.sample(i).to_vec();
        let pcm: Vec<f64> = bytes.chunks(2).map(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))).collect();
        let energy: Vec<f64> = pcm.chunks(seg).map(|c| c.iter().map(|v| v * v).sum()).collect();
        let mut order: Vec<usize> = (0..patches).collect();
        order.sort_by(|&a, &b| energy[b].total_cmp(&energy[a]));
        let (loud, quiet) = order.split_at(patches / 2);
        let e = |set: &[usize]| set.iter().map(|&k| energy[k]).sum::<f64>();
        if e(loud) < 20.0 * e(quiet) {
            continue;
        }
        let input = RawTensor::from_bytes(DataType::Int16, vec![1, 6400], bytes.clone()).unwrap();
        let (probs, attribution) = explain(&s, std::slice::from_ref(&input), &x, 0).unwrap();
        let answer = argmax(&probs);
        if answer != eval.labels[i] as usize || probs[answer] < 0.9 {
            continue;
        }
        // A saturated answer (p = 1 in f32 whichever single segment is masked) has all-zero
        // attribution: occlusion of one patch cannot rank anything there.
        if attribution.iter().all(|a| a.abs() < 1e-4) {
            continue;
        }
        // Attribution: the loud segments matter more than the quiet ones.
        let mean =
            |set: &[usize]| set.iter().map(|&k| f64::from(attribution[k])).sum::<f64>() / set.len() as f64;
        assert!(mean(loud) > mean(quiet), "clip {i}: loud {:.4} <= quiet {:.4}", mean(loud), mean(quiet));
        // Masking the quietest quarter at once (the border around the word) keeps the answer;
        // masking the loud half (the word) loses it.
        let border = &order[patches - patches / 4..];
        // Masked as the explanation masks (fill = "quietest"): with the quietest segment.
        let floor = order[patches - 1];
        let mask = |set: &[usize]| {
            let mut b = bytes.clone();
            for &k in set {
                b.copy_within(floor * seg * 2..(floor + 1) * seg * 2, k * seg * 2);
            }
            let t = RawTensor::from_bytes(DataType::Int16, vec![1, 6400], b).unwrap();
            s.run(&[t]).unwrap()[0].to_f32().unwrap()
        };
        assert_eq!(argmax(&mask(border)), answer, "clip {i}: masking the quiet border changed the answer");
        let without_word = mask(loud);
        assert!(
            without_word[answer] < 0.5 * probs[answer],
            "clip {i}: masking the word left p = {} (was {})",
            without_word[answer],
            probs[answer]
        );
        checked += 1;
        if checked == 3 {
            break;
        }
    }
    assert_eq!(checked, 3, "three clear clips in the held-out set");
}

#[test]
fn an_image_explanation_has_one_value_per_patch_and_rows_stay_apart() {
    let m = model("digits");
    let x = m.explain.clone().expect("digits declares [explain]");
    let eval = m.load_eval().unwrap().expect("an eval set");
    let s = Session::load(&m, m.variant("medium").unwrap()).unwrap();
    let bytes: Vec<u8> = (0..2).flat_map(|i| eval.sample(i).to_vec()).collect();
    let two = RawTensor::from_bytes(DataType::Fp32, vec![2, 8, 8], bytes.clone()).unwrap();
    let (_, both) = explain(&s, std::slice::from_ref(&two), &x, 0).unwrap();
    assert_eq!(both.len(), 2 * x.patches());
    let one = RawTensor::from_bytes(DataType::Fp32, vec![1, 8, 8], bytes[..64 * 4].to_vec()).unwrap();
    let (_, first) = explain(&s, std::slice::from_ref(&one), &x, 0).unwrap();
    for (a, b) in first.iter().zip(&both[..x.patches()]) {
        assert!((a - b).abs() < 1e-5, "row 0 explained alone and in a batch: {a} vs {b}");
    }
    assert_eq!(occlude(&[two], &x).unwrap()[0].shape, vec![32, 8, 8]);
}
