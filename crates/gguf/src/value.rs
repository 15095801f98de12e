//! Metadata values and the ordered key/value store with typed getters.

use std::collections::HashMap;

use crate::error::GgufError;

numbered_types! {
    /// The type tag of a metadata value, with GGUF's numeric id as discriminant.
    pub enum ValueType {
        /// `u8`.
        U8 = 0 => "u8",
        /// `i8`.
        I8 = 1 => "i8",
        /// `u16`.
        U16 = 2 => "u16",
        /// `i16`.
        I16 = 3 => "i16",
        /// `u32`.
        U32 = 4 => "u32",
        /// `i32`.
        I32 = 5 => "i32",
        /// `f32`.
        F32 = 6 => "f32",
        /// One byte, 0 or 1.
        Bool = 7 => "bool",
        /// UTF-8 string with a `u64` length prefix.
        String = 8 => "string",
        /// Element type, `u64` count, elements.
        Array = 9 => "array",
        /// `u64`.
        U64 = 10 => "u64",
        /// `i64`.
        I64 = 11 => "i64",
        /// `f64`.
        F64 = 12 => "f64",
    }
}

impl ValueType {
    /// A name for an array of this type: `"array of string"`, ...
    pub fn array_name(self) -> &'static str {
        match self {
            ValueType::U8 => "array of u8",
            ValueType::I8 => "array of i8",
            ValueType::U16 => "array of u16",
            ValueType::I16 => "array of i16",
            ValueType::U32 => "array of u32",
            ValueType::I32 => "array of i32",
            ValueType::F32 => "array of f32",
            ValueType::Bool => "array of bool",
            ValueType::String => "array of string",
            ValueType::Array => "array of array",
            ValueType::U64 => "array of u64",
            ValueType::I64 => "array of i64",
            ValueType::F64 => "array of f64",
        }
    }

    /// Whether the type is an integer of some width and signedness.
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            ValueType::U8
                | ValueType::I8
                | ValueType::U16
                | ValueType::I16
                | ValueType::U32
                | ValueType::I32
                | ValueType::U64
                | ValueType::I64
        )
    }

    /// The fewest bytes one value of this type occupies in a file: its fixed size, the length
    /// prefix of a string, or the element type and count of an array. Used to bound counts.
    pub fn min_encoded_len(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f32`.
    F32(f32),
    /// `f64`.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array, possibly of arrays.
    Array(Array),
}

impl Value {
    /// The type tag of the value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
        }
    }

    /// The name of the value's type: `"u32"`, `"string"`, `"array"`, ...
    pub fn type_name(&self) -> &'static str {
        self.value_type().name()
    }

    /// The type name, with the element type for arrays (`"array of string"`).
    fn describe(&self) -> &'static str {
        match self {
            Value::Array(array) => array.elem_type().array_name(),
            other => other.type_name(),
        }
    }

    /// The value as a wide integer, if it is an integer of any width or signedness.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as an `f64`, if it is an `f32` or `f64`.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if the value is one.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! value_from {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Value {
            fn from(v: $ty) -> Value {
                Value::$variant(v.into())
            }
        })*
    };
}

value_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => String, &str => String,
    Array => Array,
);

/// A homogeneous array: an element type and the elements, all of that type.
///
/// Arrays of arrays are allowed; each inner array has its own element type.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    elem_type: ValueType,
    values: Vec<Value>,
}

impl Array {
    /// An array of `elem_type`; fails with [`GgufError::MixedArray`] if a value has another type.
    pub fn new(elem_type: ValueType, values: Vec<Value>) -> Result<Array, GgufError> {
        if let Some((index, bad)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| v.value_type() != elem_type)
        {
            return Err(GgufError::MixedArray {
                expected: elem_type.name(),
                found: bad.type_name(),
                index,
            });
        }
        Ok(Array { elem_type, values })
    }

    /// An array of strings.
    pub fn from_strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Array {
        Array {
            elem_type: ValueType::String,
            values: items.into_iter().map(|s| Value::String(s.into())).collect(),
        }
    }

    /// An array of numbers, booleans or arrays, all converted into the same [`Value`] variant.
    ///
    /// `Array::from_values([1i32, -2])` is an array of `i32`. The element type is that of
    /// `T::default()` converted, so that an empty array is typed too.
    pub fn from_values<T: Into<Value> + Default>(items: impl IntoIterator<Item = T>) -> Array {
        let values: Vec<Value> = items.into_iter().map(Into::into).collect();
        let elem_type = match values.first() {
            Some(v) => v.value_type(),
            None => T::default().into().value_type(),
        };
        Array { elem_type, values }
    }

    /// The type of every element.
    pub fn elem_type(&self) -> ValueType {
        self.elem_type
    }

    /// The elements.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Builds an array the reader has already checked, without re-checking every element.
    pub(crate) fn from_checked(elem_type: ValueType, values: Vec<Value>) -> Array {
        debug_assert!(values.iter().all(|v| v.value_type() == elem_type));
        Array { elem_type, values }
    }
}

/// The metadata key/value pairs of a file, in file order, with typed getters.
///
/// Getters named `get_*` fail with [`GgufError::MissingKey`] when the key is absent; those
/// named `opt_*` return `Ok(None)` instead. Both fail with [`GgufError::WrongType`] when the
/// value has another type, and integer getters with [`GgufError::OutOfRange`] when it does
/// not fit.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Adds a pair; returns `false` (and changes nothing) if the key is already present.
    pub(crate) fn insert(&mut self, key: String, value: Value) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        true
    }

    pub(crate) fn with_capacity(n: usize) -> Metadata {
        Metadata {
            entries: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
        }
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let i = *self.index.get(key)?;
        self.entries.get(i).map(|(_, v)| v)
    }

    /// All pairs, in file order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_owned(),
        })
    }

    fn integer<T: TryFrom<i128>>(
        key: &str,
        value: &Value,
        expected: &'static str,
    ) -> Result<T, GgufError> {
        let wide = value
            .as_integer()
            .ok_or_else(|| wrong_type(key, expected, value))?;
        T::try_from(wide).map_err(|_| GgufError::OutOfRange {
            key: key.to_owned(),
            expected,
            value: wide,
        })
    }

    /// An integer of any stored width that fits in a `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        Self::integer(key, self.require(key)?, "u32")
    }

    /// An integer of any stored width that fits in a `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        Self::integer(key, self.require(key)?, "u64")
    }

    /// An integer of any stored width that fits in an `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        Self::integer(key, self.require(key)?, "i64")
    }

    /// An `f32`, or an `f64` narrowed to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.require(key)?;
        float(key, value)
    }

    /// A boolean.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            other => Err(wrong_type(key, "bool", other)),
        }
    }

    /// A string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| wrong_type(key, "string", value))
    }

    /// An array of any element type.
    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| wrong_type(key, "array", value))
    }

    /// An array of strings, borrowed.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let value = self.require(key)?;
        let expected = "array of string";
        match value.as_array() {
            Some(array) if array.elem_type() == ValueType::String => {
                Ok(array.values().iter().filter_map(Value::as_str).collect())
            }
            _ => Err(wrong_type(key, expected, value)),
        }
    }

    fn int_array<T: TryFrom<i128>>(
        &self,
        key: &str,
        expected: &'static str,
        elem: &'static str,
    ) -> Result<Vec<T>, GgufError> {
        let value = self.require(key)?;
        let array = value
            .as_array()
            .filter(|a| a.elem_type().is_integer())
            .ok_or_else(|| wrong_type(key, expected, value))?;
        array
            .values()
            .iter()
            .map(|v| Self::integer(key, v, elem))
            .collect()
    }

    /// An array of integers of any stored width, each of which must fit in an `i32`
    /// (token types, for example).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.int_array(key, "array of i32", "i32")
    }

    /// An array of integers of any stored width, each of which must fit in a `u32`.
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>, GgufError> {
        self.int_array(key, "array of u32", "u32")
    }

    /// An array of `f32` or `f64` (narrowed to `f32`), such as token scores.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let value = self.require(key)?;
        match value.as_array() {
            Some(a) if matches!(a.elem_type(), ValueType::F32 | ValueType::F64) => {
                a.values().iter().map(|v| float(key, v)).collect()
            }
            _ => Err(wrong_type(key, "array of f32", value)),
        }
    }

    /// Like [`Metadata::get_u32`], but `Ok(None)` when the key is absent.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.get(key)
            .map(|v| Self::integer(key, v, "u32"))
            .transpose()
    }

    /// Like [`Metadata::get_u64`], but `Ok(None)` when the key is absent.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| Self::integer(key, v, "u64"))
            .transpose()
    }

    /// Like [`Metadata::get_f32`], but `Ok(None)` when the key is absent.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.get(key).map(|v| float(key, v)).transpose()
    }

    /// Like [`Metadata::get_str`], but `Ok(None)` when the key is absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| wrong_type(key, "string", v)),
        }
    }

    /// Like [`Metadata::get_bool`], but `Ok(None)` when the key is absent.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "bool", other)),
        }
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
        found: found.describe(),
    }
}

#[allow(clippy::cast_possible_truncation)] // narrowing f64 to f32 is what the caller asked for
fn float(key: &str, value: &Value) -> Result<f32, GgufError> {
    match *value {
        Value::F32(v) => Ok(v),
        Value::F64(v) => Ok(v as f32),
        _ => Err(wrong_type(key, "f32", value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        let mut m = Metadata::default();
        assert!(m.insert("small".into(), Value::U8(7)));
        assert!(m.insert("neg".into(), Value::I32(-3)));
        assert!(m.insert("big".into(), Value::U64(u64::from(u32::MAX) + 1)));
        assert!(m.insert("f64".into(), Value::F64(0.5)));
        assert!(m.insert("flag".into(), Value::Bool(true)));
        assert!(m.insert("name".into(), Value::from("llama")));
        assert!(m.insert(
            "tokens".into(),
            Value::Array(Array::from_strings(["a", "b"]))
        ));
        assert!(m.insert(
            "types".into(),
            Value::Array(Array::from_values([1u8, 2, 3]))
        ));
        assert!(m.insert(
            "scores".into(),
            Value::Array(Array::from_values([0.25f32, -1.0]))
        ));
        assert!(m.insert(
            "empty".into(),
            Value::Array(Array::from_values(Vec::<i32>::new()))
        ));
        assert!(!m.insert("small".into(), Value::U8(1)));
        m
    }

    #[test]
    fn integer_getters_accept_any_width_that_fits() {
        let m = sample();
        assert_eq!(m.get_u32("small").unwrap(), 7);
        assert_eq!(m.get_u64("big").unwrap(), 1 << 32);
        assert_eq!(m.get_i64("neg").unwrap(), -3);
        assert!(
            matches!(m.get_u32("big"), Err(GgufError::OutOfRange { value, .. }) if value == 1 << 32)
        );
        assert!(matches!(
            m.get_u32("neg"),
            Err(GgufError::OutOfRange { value: -3, .. })
        ));
        assert!(matches!(
            m.get_u32("name"),
            Err(GgufError::WrongType {
                expected: "u32",
                found: "string",
                ..
            })
        ));
        assert!(matches!(m.get_u32("nope"), Err(GgufError::MissingKey { key }) if key == "nope"));
        assert_eq!(m.opt_u32("nope").unwrap(), None);
        assert_eq!(m.opt_u64("small").unwrap(), Some(7));
        assert!(m.opt_u32("flag").is_err());
    }

    #[test]
    fn other_getters() {
        let m = sample();
        assert_eq!(m.get_f32("f64").unwrap(), 0.5);
        assert_eq!(m.opt_f32("f64").unwrap(), Some(0.5));
        assert!(m.get_f32("small").is_err());
        assert!(m.get_bool("flag").unwrap());
        assert_eq!(m.opt_bool("nope").unwrap(), None);
        assert_eq!(m.get_str("name").unwrap(), "llama");
        assert_eq!(m.opt_str("name").unwrap(), Some("llama"));
        assert!(m.opt_str("flag").is_err());
        assert_eq!(m.get_str_array("tokens").unwrap(), vec!["a", "b"]);
        assert!(matches!(
            m.get_str_array("types"),
            Err(GgufError::WrongType {
                found: "array of u8",
                ..
            })
        ));
        assert_eq!(m.get_i32_array("types").unwrap(), vec![1, 2, 3]);
        assert_eq!(m.get_u32_array("types").unwrap(), vec![1, 2, 3]);
        assert_eq!(m.get_i32_array("empty").unwrap(), Vec::<i32>::new());
        assert!(m.get_i32_array("tokens").is_err());
        assert_eq!(m.get_f32_array("scores").unwrap(), vec![0.25, -1.0]);
        assert!(m.get_f32_array("types").is_err());
        assert_eq!(m.get_array("tokens").unwrap().len(), 2);
        assert_eq!(m.len(), 10);
        assert_eq!(m.iter().next().map(|(k, _)| k), Some("small"));
    }

    #[test]
    fn arrays_must_be_homogeneous() {
        let err = Array::new(ValueType::U32, vec![Value::U32(1), Value::I32(2)]).unwrap_err();
        assert!(matches!(
            err,
            GgufError::MixedArray {
                expected: "u32",
                found: "i32",
                index: 1
            }
        ));
        let nested = Array::new(
            ValueType::Array,
            vec![
                Value::Array(Array::from_values([1u8])),
                Value::Array(Array::from_strings(["x"])),
            ],
        )
        .unwrap();
        assert_eq!(nested.elem_type(), ValueType::Array);
        assert_eq!(Value::Array(nested).type_name(), "array");
    }

    #[test]
    fn value_is_at_most_40_bytes() {
        // The crate documentation promises this bound on metadata memory per array element.
        assert!(
            std::mem::size_of::<Value>() <= 40,
            "{}",
            std::mem::size_of::<Value>()
        );
    }

    #[test]
    fn value_type_ids_round_trip() {
        for id in 0..13 {
            let t = ValueType::from_u32(id).unwrap();
            assert_eq!(t.id(), id);
        }
        assert_eq!(ValueType::from_u32(13), None);
    }
}
