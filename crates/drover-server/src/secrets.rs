//! Secrets: per app and environment, sealed with ChaCha20-Poly1305 under a
//! 256-bit key that lives in its own file (`<data dir>/secrets.key`, mode
//! 0600, or `--secrets-key-file`), never in the database: a copy of the
//! database alone reveals no value.
//!
//! Each value is sealed with a fresh random nonce and its (app, env, name)
//! as associated data, so a sealed value moved to another slot does not
//! open. The store copies an app's sealed secrets into every release it
//! makes; agents get the copy of the release they run (with its
//! assignments, which only the node the instance is on receives) — so a
//! rollback restores the secrets of that release. Values never appear in
//! API answers, events, logs or error messages: only names do.

use anyhow::Context;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The largest value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl SecretBox {
    /// Reads the key file, or creates it (32 random bytes as hex, 0600)
    /// when it does not exist yet. A key file others can read, or one that
    /// is not a key, is refused with what to do.
    pub fn load_or_create(path: &Path) -> anyhow::Result<SecretBox> {
        let rng = SystemRandom::new();
        let bytes = match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    anyhow::bail!(
                        "the secrets key {} can be read by others (mode {:o}); run chmod 600 on it",
                        path.display(),
                        mode & 0o777
                    );
                }
                let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == 32);
                bytes.with_context(|| {
                    format!(
                        "{} is not a secrets key (64 hex digits); restore the right file, or \
                         move it away to start with a new key (secrets set with the old one \
                         will not open)",
                        path.display()
                    )
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rng.fill(&mut key)
                    .map_err(|_| anyhow::anyhow!("no randomness for the secrets key"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                crate::auth::write_secret(path, &hex::encode(key))
                    .with_context(|| format!("cannot create {}", path.display()))?;
                tracing::warn!(path = %path.display(),
                    "wrote a new secrets key; keep it apart from copies of the database");
                key.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| anyhow::anyhow!("bad secrets key length"))?;
        Ok(SecretBox {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    fn aad(app: &str, env: &str, name: &str) -> Vec<u8> {
        format!("drover-secret\0{app}\0{env}\0{name}").into_bytes()
    }

    /// `value` sealed for (app, env, name): hex of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, app: &str, env: &str, name: &str, value: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("system randomness");
        let mut data = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(app, env, name)),
                &mut data,
            )
            .expect("sealing cannot fail for in-memory data");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        hex::encode(out)
    }

    /// Opens what [`Self::seal`] made for the same (app, env, name). The
    /// error names the secret, never a value.
    pub fn open(&self, app: &str, env: &str, name: &str, sealed: &str) -> Result<String, String> {
        let fail = || {
            format!(
                "cannot open secret {name} of {app}{}: it was sealed with another secrets key \
                 (was the key file replaced?) or the stored value is damaged; set it again with \
                 `drover secrets set {app} {name}`",
                crate::view::in_env(env)
            )
        };
        let bytes = hex::decode(sealed).map_err(|_| fail())?;
        if bytes.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(app, env, name)), &mut data)
            .map_err(|_| fail())?;
        String::from_utf8(plain.to_vec()).map_err(|_| fail())
    }
}

/// A secret's name becomes an environment variable of the app: upper-case
/// letters, digits and `_`, not starting with a digit, and none of the
/// variables drover sets itself.
pub fn check_name(name: &str) -> Result<(), String> {
    if !drover_core::spec::secret_name_shape(name) {
        return Err(format!(
            "{name:?} is not a secret name: use upper-case letters, digits and _ (an environment \
             variable name such as DATABASE_URL)"
        ));
    }
    if matches!(name, "PORT" | "HOST") || name.starts_with("DROVER_") {
        return Err(format!("{name} is set by drover itself; pick another name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_in_their_slot_and_under_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let b = SecretBox::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = b.seal("web", "", "DB_URL", "postgres://u:hunter2@db/web");
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            sealed,
            b.seal("web", "", "DB_URL", "postgres://u:hunter2@db/web")
        );
        assert_eq!(
            b.open("web", "", "DB_URL", &sealed).unwrap(),
            "postgres://u:hunter2@db/web"
        );
        // Another slot: refused, and the error names no value.
        let e = b.open("api", "", "DB_URL", &sealed).unwrap_err();
        assert!(e.contains("cannot open secret DB_URL of api") && !e.contains("hunter2"));
        assert!(b.open("web", "staging", "DB_URL", &sealed).is_err());
        // The same key file again: opens; another key: does not.
        let again = SecretBox::load_or_create(&path).unwrap();
        assert!(again.open("web", "", "DB_URL", &sealed).is_ok());
        let other = SecretBox::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("web", "", "DB_URL", &sealed).is_err());
        // A key file others can read is refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretBox::load_or_create(&path).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn names_are_environment_variable_names_drover_does_not_set() {
        assert!(check_name("DATABASE_URL").is_ok());
        for bad in [
            "",
            "db_url",
            "1X",
            "A-B",
            "A B",
            "PORT",
            "HOST",
            "DROVER_APP",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
