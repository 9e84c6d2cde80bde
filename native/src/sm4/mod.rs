//! SM4 and SM4-GCM (placeholder: being implemented).

use crate::aead::BlockAead;
use crate::cpu::Sm4Path;
use crate::error::Error;

pub fn new_key(_key: &[u8], _path: Sm4Path) -> Result<Box<dyn BlockAead>, Error> {
    Err(Error::UnknownSuite)
}
