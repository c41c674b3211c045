//! Login tokens: JWT verification (HS256 with a shared secret by default, RS256/ES256 with a public
//! key as an option) and minting of development tokens.

use std::collections::HashSet;

use imgate_shared::claims::Claims;
use imgate_shared::protocol::ErrorCode;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use crate::base::unix_secs;
use crate::config::{AuthSettings, JwtAlgorithm, Settings};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The protocol error code reported to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::NotYetValid => ErrorCode::TokenNotYetValid,
            AuthError::Invalid(_) => ErrorCode::TokenInvalid,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read public key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("bad public key in {path}: {source}")]
    Key {
        path: String,
        source: jsonwebtoken::errors::Error,
    },
}

/// Verifies login tokens.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    /// Set only for HS256, where the same secret can mint development tokens.
    encoding: Option<EncodingKey>,
    /// `auth.max_token_lifetime_secs`.
    max_lifetime_secs: Option<u64>,
    /// `auth.leeway_secs`.
    leeway_secs: u64,
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
    }
}

impl Authenticator {
    pub fn new(settings: &Settings) -> Result<Self, AuthSetupError> {
        let auth: &AuthSettings = &settings.auth;
        let alg = algorithm(auth.algorithm);
        let (key, encoding) = match auth.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = settings.jwt_secret().as_bytes();
                (
                    DecodingKey::from_secret(secret),
                    Some(EncodingKey::from_secret(secret)),
                )
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let path = auth
                    .public_key_file
                    .as_ref()
                    .expect("validated: RS256/ES256 have a key file");
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| AuthSetupError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let key = if auth.algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                }
                .map_err(|source| AuthSetupError::Key {
                    path: shown,
                    source,
                })?;
                (key, None)
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = auth.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_owned(), "sub".to_owned()]);
        match &auth.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".to_owned());
            }
            None => validation.iss = None,
        }
        match &auth.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        Ok(Authenticator {
            max_lifetime_secs: auth.max_token_lifetime_secs,
            leeway_secs: auth.leeway_secs,
            key,
            validation,
            encoding,
        })
    }

    /// Verifies `token` and returns its claims; the user id is `claims.sub`.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        if let Some(max) = self.max_lifetime_secs {
            let (exp, now) = (data.claims.exp, unix_secs());
            // Time left bounds a token without `iat`, and one whose `iat` claims it was issued
            // later than it was.
            let too_long = exp.saturating_sub(now) > max.saturating_add(self.leeway_secs)
                || data
                    .claims
                    .iat
                    .is_some_and(|iat| exp.saturating_sub(iat) > max);
            if too_long {
                return Err(AuthError::Invalid(format!(
                    "the token's lifetime exceeds the maximum of {max} s: exp must be at most \
                     {max} s after iat and after now"
                )));
            }
        }
        let sub = &data.claims.sub;
        if !crate::base::valid_user_id(sub) {
            return Err(AuthError::Invalid(format!(
                "sub must be {} and not \"*\"",
                crate::base::ID_RULE
            )));
        }
        Ok(data.claims)
    }

    /// Mints an HS256 token for `user` valid for `ttl_secs` (at most `auth.max_token_lifetime_secs`);
    /// `None` unless the algorithm is HS256.
    pub fn mint(&self, user: &str, ttl_secs: u64, settings: &AuthSettings) -> Option<String> {
        let encoding = self.encoding.as_ref()?;
        let now = unix_secs();
        let ttl_secs = settings
            .max_token_lifetime_secs
            .map_or(ttl_secs, |max| ttl_secs.min(max));
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl_secs,
            nbf: None,
            iat: Some(now),
            iss: settings.issuer.clone(),
            aud: settings.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn settings() -> Settings {
        let mut s = Settings::default();
        s.auth.secret = Some(Secret::new("test-secret"));
        s.auth.leeway_secs = 0;
        s
    }

    #[test]
    fn minted_token_verifies_and_wrong_secret_does_not() {
        let s = settings();
        let auth = Authenticator::new(&s).unwrap();
        let token = auth.mint("alice", 60, &s.auth).unwrap();
        assert_eq!(auth.verify(&token).unwrap().sub, "alice");

        let mut other = settings();
        other.auth.secret = Some(Secret::new("other"));
        let err = Authenticator::new(&other)
            .unwrap()
            .verify(&token)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::TokenInvalid);
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let mut s = settings();
        let token = Authenticator::new(&s)
            .unwrap()
            .mint("bob", 60, &s.auth)
            .unwrap();
        s.auth.issuer = Some("https://issuer.example".into());
        let err = Authenticator::new(&s).unwrap().verify(&token).unwrap_err();
        assert_eq!(err.code(), ErrorCode::TokenInvalid);
        let token = Authenticator::new(&s)
            .unwrap()
            .mint("bob", 60, &s.auth)
            .unwrap();
        s.auth.audience = Some("imgate".into());
        assert!(Authenticator::new(&s).unwrap().verify(&token).is_err());
        let token = Authenticator::new(&s)
            .unwrap()
            .mint("bob", 60, &s.auth)
            .unwrap();
        assert_eq!(
            Authenticator::new(&s).unwrap().verify(&token).unwrap().sub,
            "bob"
        );
    }

    #[test]
    fn es256_with_a_public_key_file() {
        let dir = std::env::temp_dir().join(format!("imgate-es256-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (private, public) = (dir.join("private.pem"), dir.join("public.pem"));
        let openssl = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .status()
                .map(|s| s.success());
            assert!(matches!(ok, Ok(true)), "openssl {args:?} failed");
        };
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            private.to_str().unwrap(),
        ]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            private.to_str().unwrap(),
            "-out",
            dir.join("pk8.pem").to_str().unwrap(),
        ]);
        openssl(&[
            "ec",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);

        let mut s = Settings::default();
        s.auth.algorithm = JwtAlgorithm::ES256;
        s.auth.public_key_file = Some(public.clone());
        s.validate().unwrap();
        let auth = Authenticator::new(&s).unwrap();
        assert!(
            auth.mint("x", 60, &s.auth).is_none(),
            "no minting without the secret"
        );

        let key = EncodingKey::from_ec_pem(&std::fs::read(dir.join("pk8.pem")).unwrap()).unwrap();
        let claims = Claims {
            sub: "carol".into(),
            exp: unix_secs() + 60,
            nbf: None,
            iat: None,
            iss: None,
            aud: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap();
        assert_eq!(auth.verify(&token).unwrap().sub, "carol");

        // An HS256 token signed with anything is refused by an ES256 node (no algorithm confusion).
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
        )
        .unwrap();
        assert_eq!(
            auth.verify(&hs).unwrap_err().code(),
            ErrorCode::TokenInvalid
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
