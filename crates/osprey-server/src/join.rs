//! The cluster join token: what an agent must present to attach to the gateway.
//!
//! An attached agent receives tenants' inputs and returns answers that the gateway passes on,
//! so attaching is a privilege. Every `Attach` stream must carry the token in its
//! `osprey-join-token` metadata entry; the gateway compares SHA-256 digests in constant time
//! (neither timing nor order reveals which bytes matched) and refuses the stream with
//! `UNAUTHENTICATED` before reading a message otherwise. There is no way to turn this off.
//!
//! Where the token comes from, first match wins (as k3s does with its node token):
//! 1. `OSPREY_JOIN_TOKEN` in the gateway's environment (a Kubernetes Secret, a test);
//! 2. the file named by `[cluster] join_token_file`, or the default state file
//!    ([`default_token_file`]): read if it exists, else a new random token (256 bits from the
//!    operating system) is written there, readable by its owner only (mode 0600).
//!
//! Agents present it with `osprey agent --join ADDR --token TOKEN` (or `--token-file`, or the
//! same environment variable).

use osprey_core::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// gRPC metadata key carrying the token on `Attach`.
pub const METADATA_KEY: &str = "osprey-join-token";
/// Environment variable holding the token, for the gateway and for agents.
pub const ENV: &str = "OSPREY_JOIN_TOKEN";

/// Where the token is when it was not given: the verifier keeps only its digest.
#[derive(Clone)]
pub struct JoinToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(..)")
    }
}

/// Where a resolved token came from (for the start-up message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Environment,
    /// Read from an existing file.
    File(PathBuf),
    /// Generated now and written to this file.
    Generated(PathBuf),
}

/// `a == b` in constant time (`subtle`: no early exit, and no branch the optimiser may add).
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq as _;
    bool::from(a.ct_eq(b))
}

/// The default token file: `$OSPREY_STATE_DIR/join-token`, else
/// `$XDG_STATE_HOME/osprey/join-token`, else `$HOME/.local/state/osprey/join-token`, else
/// `./osprey-join-token`.
pub fn default_token_file() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("OSPREY_STATE_DIR") {
        return d.join("join-token");
    }
    if let Some(d) = var("XDG_STATE_HOME") {
        return d.join("osprey").join("join-token");
    }
    if let Some(h) = var("HOME") {
        return h.join(".local/state/osprey/join-token");
    }
    PathBuf::from("osprey-join-token")
}

/// Tokens are printable: 64 hex digits when generated; anything of 16-512 visible ASCII
/// characters when given.
fn check_format(token: &str, from: &str) -> Result<()> {
    if !(16..=512).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(format!(
            "{from}: a join token is 16 to 512 visible ASCII characters (no spaces)"
        )));
    }
    Ok(())
}

fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::internal(format!("reading /dev/urandom for a join token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads a token file (first line, trimmed).
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid(format!("reading the join token {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    check_format(&token, &path.display().to_string())?;
    Ok(token)
}

fn write_private(path: &Path, token: &str) -> Result<()> {
    use std::io::Write;
    let fail =
        |e: std::io::Error| Error::internal(format!("writing the join token to {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(fail)?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(fail)
}

impl JoinToken {
    pub fn new(token: &str) -> JoinToken {
        JoinToken { digest: Sha256::digest(token.as_bytes()).into() }
    }

    /// A token nobody knows: no agent can attach (in-process agents only).
    pub fn unguessable() -> JoinToken {
        JoinToken::new(&random_token().unwrap_or_else(|_| format!("{:?}", std::time::Instant::now())))
    }

    /// Resolves the gateway's token (see the module docs for the order).
    pub fn resolve(file: Option<&Path>) -> Result<(JoinToken, TokenSource)> {
        if let Some(t) = std::env::var(ENV).ok().filter(|t| !t.is_empty()) {
            check_format(&t, ENV)?;
            return Ok((JoinToken::new(&t), TokenSource::Environment));
        }
        let path = file.map(Path::to_path_buf).unwrap_or_else(default_token_file);
        if path.exists() {
            let t = read_token_file(&path)?;
            return Ok((JoinToken::new(&t), TokenSource::File(path)));
        }
        let t = random_token()?;
        write_private(&path, &t)?;
        Ok((JoinToken::new(&t), TokenSource::Generated(path)))
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn verify(&self, presented: Option<&str>) -> bool {
        let Some(p) = presented else { return false };
        let d: [u8; 32] = Sha256::digest(p.as_bytes()).into();
        ct_eq(&d, &self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_verifies() {
        let t = JoinToken::new("0123456789abcdef0123");
        assert!(t.verify(Some("0123456789abcdef0123")));
        for bad in [None, Some(""), Some("0123456789abcdef012"), Some("0123456789abcdef01234")] {
            assert!(!t.verify(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_generated_token_is_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("osprey-join-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state/join-token");
        let (t1, src) = JoinToken::resolve(Some(&path)).unwrap();
        assert_eq!(src, TokenSource::Generated(path.clone()));
        let text = read_token_file(&path).unwrap();
        assert_eq!(text.len(), 64);
        assert!(t1.verify(Some(&text)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (t2, src) = JoinToken::resolve(Some(&path)).unwrap();
        assert_eq!(src, TokenSource::File(path.clone()));
        assert!(t2.verify(Some(&text)));
        std::fs::write(&path, "short\n").unwrap();
        assert!(JoinToken::resolve(Some(&path)).unwrap_err().message.contains("16 to 512"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
