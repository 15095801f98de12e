//! The GGUF file format: parse, validate, memory-map; typed metadata and tensor views; a writer.
//!
//! A [`GgufFile`] is validated completely when it is opened: every count, length, type id,
//! shape and tensor byte range is checked against the file before anything is allocated or
//! sliced, so the accessors afterwards are infallible and never panic. Each failure is a
//! [`GgufError`] that names what is wrong and, where it applies, the byte offset in the file.
//!
//! GGUF versions 2 and 3 are read; version 1 (32-bit counts) is rejected, as llama.cpp does.
//! This crate does no math: tensor data is handed out as raw little-endian bytes.
//!
//! ```
//! use souverain_gguf::{GgmlType, GgufFile, GgufWriter, Value};
//!
//! let mut writer = GgufWriter::new(3);
//! writer.add_kv("general.architecture", Value::from("llama"));
//! writer.add_kv("llama.block_count", Value::U32(2));
//! let weights: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
//! writer.add_tensor("w", &[2, 2], GgmlType::F32, weights)?;
//!
//! let file = GgufFile::from_bytes(writer.to_bytes())?;
//! assert_eq!(file.metadata().get_str("general.architecture")?, "llama");
//! assert_eq!(file.metadata().get_u32("llama.block_count")?, 2);
//! let info = file.tensor("w").expect("tensor w");
//! assert_eq!(info.dims, vec![2, 2]);
//! assert_eq!(file.tensor_data(info).len(), 16);
//! # Ok::<(), souverain_gguf::GgufError>(())
//! ```
//!
//! Memory: the parsed metadata costs at most a constant multiple of the metadata bytes in the
//! file (each array element becomes one [`Value`], 40 bytes on 64-bit targets, so a one-byte
//! element is the worst case at 40x); no size read from the file is ever trusted for an
//! allocation before it has been bounded by the bytes that remain.

/// Declares a `#[repr(u32)]` enum of the format's numbered types from one list (doc, variant,
/// numeric id, name) and writes `ALL`, `from_u32`, `id` and `name` from that list, so the ids
/// and names are stated once.
macro_rules! numbered_types {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[doc = $doc:expr])* $variant:ident = $id:literal => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $( $(#[doc = $doc])* $variant = $id, )*
        }

        impl $name {
            /// Every type this crate knows, in id order.
            pub const ALL: [$name; [$($id),*].len()] = [$($name::$variant),*];

            /// The type with numeric id `id`, or `None` for an id the format does not define
            /// (or has removed).
            pub fn from_u32(id: u32) -> Option<$name> {
                Self::ALL.iter().copied().find(|t| t.id() == id)
            }

            /// The numeric id of the type, as stored in the file.
            pub fn id(self) -> u32 {
                self as u32
            }

            /// The type's name as ggml writes it (`"f32"`, `"q4_K"`, `"string"`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )*
                }
            }
        }
    };
}

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, MAX_ARRAY_DEPTH, MAX_DIMS, TensorInfo};
pub use types::GgmlType;
pub use value::{Array, Metadata, Value, ValueType};
pub use writer::{GgufWriter, raw};

/// The four bytes every GGUF file starts with: `GGUF`.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// The alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that sets the alignment of tensor data.
pub const ALIGNMENT_KEY: &str = "general.alignment";
