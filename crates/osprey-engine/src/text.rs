//! Text into a transformer's token inputs: the model's own WordPiece tokenizer (Hugging Face
//! `tokenizer.json`, through the `tokenizers` crate), truncated and padded to the fixed
//! sequence length that split inference runs at.

use osprey_core::error::{Error, Result};
use std::path::Path;

pub struct TextEncoder {
    tokenizer: tokenizers::Tokenizer,
    seq_len: usize,
}

/// One sentence as token inputs.
pub struct Encoded {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    /// Tokens the sentence had before truncation (special tokens included).
    pub tokens: usize,
}

impl TextEncoder {
    pub fn load(path: &Path, seq_len: usize) -> Result<TextEncoder> {
        let mut tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        // The file's own padding and truncation (128) are replaced by the served length.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        if seq_len < 2 {
            return Err(Error::invalid("a sequence needs room for [CLS] and [SEP]"));
        }
        Ok(TextEncoder { tokenizer, seq_len })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokenizes `text`; longer sentences keep their first `seq_len - 1` tokens and the final
    /// `[SEP]`.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("cannot tokenize the input: {e}")))?;
        let all = enc.get_ids();
        let tokens = all.len();
        let mut ids: Vec<i64> = all.iter().map(|&i| i64::from(i)).collect();
        if ids.len() > self.seq_len {
            let sep = ids[ids.len() - 1];
            ids.truncate(self.seq_len - 1);
            ids.push(sep);
        }
        let mut mask = vec![1i64; ids.len()];
        ids.resize(self.seq_len, 0);
        mask.resize(self.seq_len, 0);
        Ok(Encoded { ids, mask, tokens })
    }
}
