//! Login tokens: HS256 JWTs whose `sub` is the user id, minted like the gateway's `imgate token`.

use imgate_shared::claims::Claims;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

pub struct Minter {
    key: EncodingKey,
    header: Header,
    ttl_secs: u64,
}

impl Minter {
    pub fn new(secret: &str, ttl_secs: u64) -> Minter {
        Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            ttl_secs,
        }
    }

    pub fn mint(&self, user: &str) -> String {
        let now = crate::now_us() / 1_000_000;
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + self.ttl_secs,
            nbf: None,
            iat: Some(now),
            iss: None,
            aud: None,
        };
        encode(&self.header, &claims, &self.key).expect("HS256 tokens always encode")
    }
}
