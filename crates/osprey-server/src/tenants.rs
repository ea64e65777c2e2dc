//! Tenants: authentication by API key, per-tenant objectives and rate quotas.
//!
//! Keys are configured only as SHA-256 hashes. A presented key (`Authorization: Bearer <key>`
//! on HTTP, the `authorization` metadata entry on gRPC) is hashed and compared with every
//! configured hash in constant time, so neither the comparison nor the scan order reveals
//! which bytes or which tenant matched. With no tenant configured, one `default` tenant with no
//! key keeps `osprey serve` working out of the box; as soon as any key is configured, every
//! route but health needs one.

use crate::join::ct_eq;
use osprey_core::config::{Role, TenantConfig};
use osprey_core::error::{Error, ErrorCode, Result};
use osprey_policy::quota::TokenBucket;
use sha2::{Digest, Sha256};
use std::sync::Mutex;

pub struct Tenant {
    pub config: TenantConfig,
    /// `config.name`, shared by the answers of this tenant's requests.
    pub name: std::sync::Arc<str>,
    hashes: Vec<[u8; 32]>,
    bucket: Option<Mutex<TokenBucket>>,
    /// Compute milliseconds per second.
    cost_bucket: Option<Mutex<TokenBucket>>,
}

pub struct Tenants {
    list: Vec<Tenant>,
    keys_required: bool,
}

/// `sha256:<hex>` of a key, the form the configuration stores.
pub fn hash_key(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tenants {
    /// `default_slo_ms` is the default tenant's latency objective when none is configured.
    pub fn new(configs: &[TenantConfig], default_slo_ms: u64, now_us: u64) -> Tenants {
        let configs = if configs.is_empty() {
            vec![TenantConfig {
                name: "default".into(),
                api_keys: Vec::new(),
                api_keys_file: None,
                latency_slo_ms: default_slo_ms,
                accuracy_floor: 0.0,
                weight: 1.0,
                rate: None,
                burst: None,
                models: Vec::new(),
                // With no keys nobody can be told apart: the open default may do everything.
                role: Role::Admin,
                compute_rate_ms: None,
                compute_burst_ms: None,
                quality: None,
            }]
        } else {
            configs.to_vec()
        };
        let keys_required = configs.iter().any(|t| !t.api_keys.is_empty());
        let list = configs
            .into_iter()
            .map(|c| Tenant {
                name: c.name.as_str().into(),
                hashes: c.api_keys.iter().filter_map(|k| parse_hash(k)).collect(),
                bucket: c.rate.map(|r| {
                    Mutex::new(TokenBucket::new(
                        r,
                        c.burst.unwrap_or_else(|| r.ceil().max(1.0) as u32),
                        now_us,
                    ))
                }),
                cost_bucket: c
                    .compute_rate_ms
                    .map(|r| Mutex::new(TokenBucket::with_burst(r, c.compute_burst_ms.unwrap_or(r), now_us))),
                config: c,
            })
            .collect();
        Tenants { list, keys_required }
    }

    pub fn get(&self, i: usize) -> &Tenant {
        &self.list[i.min(self.list.len() - 1)]
    }

    /// The tightest latency objective among the tenants that may run `model`, ms.
    pub fn tightest_slo_ms(&self, model: &str) -> Option<u64> {
        self.list
            .iter()
            .filter(|t| t.config.models.is_empty() || t.config.models.iter().any(|m| m == model))
            .map(|t| t.config.latency_slo_ms)
            .min()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|t| t.config.name.as_str())
    }

    /// Resolves the caller from an `Authorization` value: `Bearer <key>`, or HTTP Basic
    /// (`Basic base64(name:key)`, what a browser sends after its password prompt; the name is
    /// not checked, the key alone identifies the tenant).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<usize> {
        if !self.keys_required {
            return Ok(0);
        }
        let unauth = || {
            Error::new(
                ErrorCode::Unauthenticated,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
            )
        };
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let (scheme, credentials) = authorization
            .and_then(|h| h.trim_start().split_once(' '))
            .map(|(s, k)| (s, k.trim()))
            .filter(|(_, k)| !k.is_empty())
            .ok_or_else(unauth)?;
        let basic;
        let key = if scheme.eq_ignore_ascii_case("bearer") {
            credentials
        } else if scheme.eq_ignore_ascii_case("basic") {
            use base64::Engine as _;
            basic = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(unauth)?;
            basic.split_once(':').map(|(_, k)| k).filter(|k| !k.is_empty()).ok_or_else(unauth)?
        } else {
            return Err(unauth());
        };
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (i, t) in self.list.iter().enumerate() {
            for h in &t.hashes {
                // No early exit: every hash is compared.
                if ct_eq(h, &presented) && found.is_none() {
                    found = Some(i);
                }
            }
        }
        found.ok_or_else(unauth)
    }

    /// The caller's role. With no key configured anywhere nobody can be told apart, so the
    /// anonymous caller may do everything (as with no tenant at all): roles need keys.
    pub fn role(&self, tenant: usize) -> Role {
        if self.keys_required { self.get(tenant).config.role } else { Role::Admin }
    }

    /// Checks the tenant's role includes `role`.
    pub fn require(&self, tenant: usize, role: Role) -> Result<()> {
        let t = self.get(tenant);
        if self.role(tenant) < role {
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "this needs the {} role; tenant '{}' has the {} role",
                    role.as_str(),
                    t.config.name,
                    self.role(tenant).as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Whether the tenant may see `model`'s metadata, readiness and statistics: a model it
    /// may use, or any model for monitors and admins.
    pub fn may_see(&self, tenant: usize, model: &str) -> bool {
        self.role(tenant) >= Role::Monitor || self.check_model(tenant, model).is_ok()
    }

    /// [`Tenants::may_see`] as an error.
    pub fn check_visible(&self, tenant: usize, model: &str) -> Result<()> {
        if self.may_see(tenant, model) { Ok(()) } else { self.check_model(tenant, model) }
    }

    /// Checks the tenant may run `model`.
    pub fn check_model(&self, tenant: usize, model: &str) -> Result<()> {
        let t = self.get(tenant);
        if !t.config.models.is_empty() && !t.config.models.iter().any(|m| m == model) {
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                format!("tenant '{}' may not use model '{model}'", t.config.name),
            ));
        }
        Ok(())
    }

    /// Checks the tenant may use `model` and takes `rows` samples and `cost_ms` compute
    /// milliseconds from its quotas at `now_us` (both or neither).
    pub fn admit(&self, tenant: usize, model: &str, rows: u32, cost_ms: f64, now_us: u64) -> Result<()> {
        self.check_model(tenant, model)?;
        let t = self.get(tenant);
        if let Some(b) = &t.cost_bucket {
            let ok = b.lock().map(|mut b| b.try_take_amount(now_us, cost_ms)).unwrap_or(false);
            if !ok {
                return Err(Error::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "tenant '{}' is over its compute quota ({} compute ms/s; this request costs {cost_ms:.2} ms); slow down",
                        t.config.name,
                        t.config.compute_rate_ms.unwrap_or(0.0),
                    ),
                ));
            }
        }
        if let Some(b) = &t.bucket {
            let ok = b.lock().map(|mut b| b.try_take(now_us, rows)).unwrap_or(false);
            if !ok {
                if let Some(c) = &t.cost_bucket
                    && let Ok(mut c) = c.lock()
                {
                    c.refund(cost_ms);
                }
                return Err(Error::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "tenant '{}' is over its rate quota ({} samples/s, burst {}); slow down",
                        t.config.name,
                        t.config.rate.unwrap_or(0.0),
                        t.config.burst.unwrap_or(0)
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, key: Option<&str>) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            api_keys: key.map(|k| vec![hash_key(k)]).unwrap_or_default(),
            api_keys_file: None,
            latency_slo_ms: 100,
            accuracy_floor: 0.0,
            weight: 1.0,
            rate: Some(2.0),
            burst: Some(2),
            models: vec!["digits".into()],
            role: Role::Tenant,
            compute_rate_ms: None,
            compute_burst_ms: None,
            quality: None,
        }
    }

    #[test]
    fn keys_identify_tenants_and_everything_else_is_refused() {
        let ts = Tenants::new(&[tenant("a", Some("ka")), tenant("b", Some("kb"))], 1000, 0);
        assert_eq!(ts.authenticate(Some("Bearer kb")).unwrap(), 1);
        assert_eq!(ts.authenticate(Some("Bearer ka")).unwrap(), 0);
        assert_eq!(ts.authenticate(Some("BEARER ka")).unwrap(), 0);
        assert_eq!(ts.authenticate(Some("bearer  kb ")).unwrap(), 1);
        for bad in
            [None, Some("Bearer nope"), Some("ka"), Some("Bearer "), Some("Basic ka"), Some("Bearerka")]
        {
            assert_eq!(ts.authenticate(bad).unwrap_err().code, ErrorCode::Unauthenticated);
        }
        // HTTP Basic, as a browser sends it: the key is the password, the name is not checked.
        use base64::Engine as _;
        let basic = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert_eq!(ts.authenticate(Some(&basic("admin:kb"))).unwrap(), 1);
        assert_eq!(ts.authenticate(Some(&basic(":ka"))).unwrap(), 0);
        assert_eq!(ts.authenticate(Some(&basic("anyone:a:b"))).unwrap_err().code, ErrorCode::Unauthenticated);
        for bad in ["kb", "admin:", "admin:nope"] {
            assert_eq!(
                ts.authenticate(Some(&basic(bad))).unwrap_err().code,
                ErrorCode::Unauthenticated,
                "{bad}"
            );
        }
        assert_eq!(ts.authenticate(Some("Basic !!!")).unwrap_err().code, ErrorCode::Unauthenticated);
    }

    #[test]
    fn no_tenants_means_an_open_default() {
        let ts = Tenants::new(&[], 5000, 0);
        assert_eq!(ts.authenticate(None).unwrap(), 0);
        assert_eq!(ts.get(0).config.latency_slo_ms, 5000);
        assert!(ts.admit(0, "anything", 1000, 0.0, 0).is_ok());
    }

    #[test]
    fn models_and_quotas_are_enforced_per_tenant() {
        let ts = Tenants::new(&[tenant("a", Some("ka")), tenant("b", Some("kb"))], 1000, 0);
        assert_eq!(ts.admit(0, "spoken_digits", 1, 0.0, 0).unwrap_err().code, ErrorCode::PermissionDenied);
        assert!(ts.admit(0, "digits", 2, 0.0, 0).is_ok());
        assert_eq!(ts.admit(0, "digits", 1, 0.0, 0).unwrap_err().code, ErrorCode::ResourceExhausted);
        // Tenant b's quota is untouched by a's burst.
        assert!(ts.admit(1, "digits", 2, 0.0, 0).is_ok());
        assert!(ts.admit(0, "digits", 1, 0.0, 600_000).is_ok());
    }

    #[test]
    fn hashes_round_trip() {
        let h = hash_key("secret");
        assert!(h.starts_with("sha256:") && h.len() == 71);
        assert!(parse_hash(&h).is_some());
        assert!(parse_hash("sha256:zz").is_none());
    }
}
