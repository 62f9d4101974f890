//! A restricted unpickler for the `data.pkl` of a `torch.save` archive.
//!
//! Unpickling with Python runs arbitrary code: a pickle can name any importable callable
//! (`os.system`, `builtins.eval`, ...) and call it. Model files come from the internet, so
//! this module implements the pickle virtual machine itself and never executes anything:
//! GLOBAL resolves only an allow-list of the names torch.save writes for a state dict, and
//! REDUCE "calls" those by building plain Rust values. Any other global is refused before
//! anything happens.
//!
//! Defences against malformed or hostile input: every length is checked against the bytes
//! that remain before anything is allocated; the stack, mark stack and memo are bounded;
//! nesting depth is bounded (dropping a million-deep tuple would overflow the stack); and
//! copying work is budgeted (memo fetches could otherwise double a structure's size per
//! opcode). Values are reference-counted and copy-on-write, so they can never form a cycle.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// The element type named by a `torch.*Storage` class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StorageKind {
    Supported(DType),
    /// A storage class vicuna knows but cannot read; the name is for messages.
    Unsupported(&'static str),
}

/// A storage a tensor views: `<archive>/data/<key>`, `numel` elements of `kind`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StorageRef {
    pub kind: StorageKind,
    pub key: String,
    pub numel: u64,
}

/// What `torch._utils._rebuild_tensor_v2` would have built: a view into a storage.
/// Offsets and strides count elements, as in PyTorch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// The names torch.save uses for a state dict, and nothing else.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    OrderedDict,
    TorchSize,
    Storage(StorageKind),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    use DType::*;
    use StorageKind::*;
    let global = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch", "Size") => Global::TorchSize,
        ("torch", "FloatStorage") => Global::Storage(Supported(F32)),
        ("torch", "HalfStorage") => Global::Storage(Supported(F16)),
        ("torch", "BFloat16Storage") => Global::Storage(Supported(BF16)),
        ("torch", "DoubleStorage") => Global::Storage(Unsupported("torch.DoubleStorage (float64)")),
        ("torch", "LongStorage") => Global::Storage(Unsupported("torch.LongStorage (int64)")),
        ("torch", "IntStorage") => Global::Storage(Unsupported("torch.IntStorage (int32)")),
        ("torch", "ShortStorage") => Global::Storage(Unsupported("torch.ShortStorage (int16)")),
        ("torch", "CharStorage") => Global::Storage(Unsupported("torch.CharStorage (int8)")),
        ("torch", "ByteStorage") => Global::Storage(Unsupported("torch.ByteStorage (uint8)")),
        ("torch", "BoolStorage") => Global::Storage(Unsupported("torch.BoolStorage (bool)")),
        ("torch", "ComplexFloatStorage") => Global::Storage(Unsupported("torch.ComplexFloatStorage (complex64)")),
        ("torch", "ComplexDoubleStorage") => Global::Storage(Unsupported("torch.ComplexDoubleStorage (complex128)")),
        _ => return None,
    };
    Some(global)
}

/// A Python value as far as a state dict needs them. Compound values are shared (`Rc`)
/// and carry their nesting depth.
#[derive(Clone, Debug)]
enum Value {
    None,
    // Booleans, floats and bytes occur (requires_grad, metadata) but a state dict never
    // needs their values, so only their kind is kept.
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<[Value]>, u8),
    List(Rc<Vec<Value>>, u8),
    Dict(Rc<Vec<(Value, Value)>>, u8),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn depth(&self) -> u8 {
        match self {
            Value::Tuple(_, d) | Value::List(_, d) | Value::Dict(_, d) => *d,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a str",
            Value::Bytes => "bytes",
            Value::Tuple(..) => "a tuple",
            Value::List(..) => "a list",
            Value::Dict(..) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

// Bounds. A real data.pkl of a 13B shard is ~60 KB with a few thousand stack/memo slots;
// these leave orders of magnitude of room while keeping hostile input cheap.
const MAX_DEPTH: u8 = 32;
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 20;
const MAX_COPY_WORK: usize = 1 << 24;
const MAX_DIMS: usize = 64;

/// Runs `pickle` (the bytes of data.pkl) and returns the state dict it describes:
/// (name, tensor) in pickle order. `file` is the .bin file, for messages.
pub(crate) fn load_state_dict(pickle: &[u8], file: &Path) -> Result<Vec<(String, TensorRef)>> {
    let mut vm = Machine {
        data: pickle,
        pos: 0,
        op_pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copy_work: 0,
        file,
    };
    let result = vm.run()?;
    let Value::Dict(items, _) = result else {
        return Err(Error::new(format!(
            "{}: data.pkl holds {}, not a state dict of tensors; vicuna reads checkpoints saved by \
             save_pretrained / torch.save(model.state_dict())",
            file.display(),
            result.kind()
        )));
    };
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items.iter() {
        let Value::Str(name) = key else {
            return Err(Error::new(format!(
                "{}: data.pkl has a state dict key that is {}, not a tensor name",
                file.display(),
                key.kind()
            )));
        };
        let Value::Tensor(tensor) = value else {
            return Err(Error::new(format!(
                "{}: state dict entry {name} holds {}, not a tensor; vicuna reads state dicts of tensors only",
                file.display(),
                value.kind()
            )));
        };
        out.push((name.to_string(), TensorRef::clone(tensor)));
    }
    Ok(out)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the opcode being run starts, for messages.
    op_pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK (Python 3's "metastack" without copying).
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    copy_work: usize,
    file: &'a Path,
}

impl Machine<'_> {
    fn malformed(&self, what: impl std::fmt::Display) -> Error {
        Error::new(format!(
            "{}: data.pkl is malformed at byte {} ({what}); the file is damaged or not a torch.save checkpoint — download it again",
            self.file.display(),
            self.op_pos
        ))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| self.malformed(format!("needs {n} more bytes than the pickle holds")))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn len_u64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.malformed(format!("length {n} is absurd")))
    }

    /// A newline-terminated line (GLOBAL's operands).
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n =
            rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.malformed("GLOBAL operand has no end of line"))?;
        let text = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(text)
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => Err(self.malformed("a string is not valid UTF-8")),
        }
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.malformed("stack grows without bound"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        // Values under the innermost MARK belong to an outer frame: popping them is underflow.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        Ok(self.stack.pop().expect("length checked"))
    }

    fn top(&self) -> Result<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        Ok(self.stack.last().expect("length checked"))
    }

    /// Pops everything above the innermost MARK, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().ok_or_else(|| self.malformed("MARK expected"))?;
        Ok(self.stack.split_off(mark))
    }

    fn nested_depth(&self, children: &[Value]) -> Result<u8> {
        self.grown_depth(1, children)
    }

    fn tuple(&self, items: Vec<Value>) -> Result<Value> {
        let depth = self.nested_depth(&items)?;
        Ok(Value::Tuple(Rc::from(items), depth))
    }

    fn charge(&mut self, work: usize) -> Result<()> {
        self.copy_work = self.copy_work.saturating_add(work);
        if self.copy_work > MAX_COPY_WORK {
            return Err(self.malformed("copies shared values without bound"));
        }
        Ok(())
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        let value = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(self.malformed("memo grows without bound"));
        }
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let value = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| self.malformed(format!("memo entry {index} was never stored")))?;
        self.push(value)
    }

    /// The depth of a container holding `children` on top of `depth`, or an error.
    fn grown_depth(&self, depth: u8, children: &[Value]) -> Result<u8> {
        let child = children.iter().map(Value::depth).max().unwrap_or(0);
        let depth = depth.max(child + 1);
        if depth > MAX_DEPTH {
            return Err(self.malformed(format!("values nested deeper than {MAX_DEPTH}")));
        }
        Ok(depth)
    }

    /// Appends `items` to the list on top of the stack (copy-on-write if the memo shares it).
    fn extend_list(&mut self, items: Vec<Value>) -> Result<()> {
        let Value::List(mut list, depth) = self.pop()? else {
            return Err(self.malformed("APPEND to something that is not a list"));
        };
        let depth = self.grown_depth(depth, &items)?;
        // make_mut copies the container when the memo still holds it.
        let copied = if Rc::strong_count(&list) > 1 { list.len() } else { 0 };
        self.charge(copied + 1)?;
        Rc::make_mut(&mut list).extend(items);
        self.push(Value::List(list, depth))
    }

    /// Sets key/value pairs in the dict on top of the stack (copy-on-write if shared).
    fn extend_dict(&mut self, flat: Vec<Value>) -> Result<()> {
        if !flat.len().is_multiple_of(2) {
            return Err(self.malformed("SETITEMS with an odd number of values"));
        }
        let Value::Dict(mut dict, depth) = self.pop()? else {
            return Err(self.malformed("SETITEM on something that is not a dict"));
        };
        let depth = self.grown_depth(depth, &flat)?;
        // make_mut copies the container when the memo still holds it.
        let copied = if Rc::strong_count(&dict) > 1 { dict.len() } else { 0 };
        self.charge(copied + 1)?;
        let pairs = Rc::make_mut(&mut dict);
        let mut flat = flat.into_iter();
        while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
            pairs.push((k, v));
        }
        self.push(Value::Dict(dict, depth))
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_pos = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(self.malformed("the pickle ends without STOP; it is truncated"));
            };
            self.pos += 1;
            match op {
                0x80 => {
                    // PROTO
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.malformed(format!("pickle protocol {proto} is unknown")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint for buffered readers; the data is all here.
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    return self.pop();
                }
                b'(' => {
                    if self.marks.len() >= MAX_STACK {
                        return Err(self.malformed("too many MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'N' => self.push(Value::None)?,
                0x88 | 0x89 => self.push(Value::Bool)?, // NEWTRUE / NEWFALSE
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement of n bytes.
                    let n = if op == 0x8a { usize::from(self.u8()?) } else { self.u32()? as usize };
                    if n > 8 {
                        return Err(self.malformed(format!("integer of {n} bytes is too large")));
                    }
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &b) in bytes.iter().enumerate() {
                        v |= i64::from(b) << (8 * i);
                    }
                    if (1..8).contains(&n) && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // sign-extend
                    }
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    // BINFLOAT: 8 big-endian bytes.
                    self.take(8)?;
                    self.push(Value::Float)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                b'B' | b'C' | 0x8e => {
                    // BINBYTES / SHORT_BINBYTES / BINBYTES8
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => usize::from(self.u8()?),
                        _ => self.len_u64()?,
                    };
                    self.take(n)?;
                    self.push(Value::Bytes)?;
                }
                b'}' => self.push(Value::Dict(Rc::new(Vec::new()), 1))?,
                b']' => self.push(Value::List(Rc::new(Vec::new()), 1))?,
                b')' => self.push(Value::Tuple(Rc::from(Vec::new()), 1))?,
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.tuple(items)?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.tuple(items)?;
                    self.push(v)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let depth = self.nested_depth(&items)?;
                    self.push(Value::List(Rc::new(items), depth))?;
                }
                b'd' => {
                    let flat = self.pop_mark()?;
                    self.push(Value::Dict(Rc::new(Vec::new()), 1))?;
                    self.extend_dict(flat)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![key, value])?;
                }
                b'u' => {
                    let flat = self.pop_mark()?;
                    self.extend_dict(flat)?;
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    // MEMOIZE: the next free index.
                    let i = u32::try_from(self.memo.len()).map_err(|_| self.malformed("memo overflow"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.push(g)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.malformed("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(storage)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                b'b' => {
                    // BUILD: only OrderedDict state dicts get one (their `_metadata`
                    // attribute, torch's per-module version info); vicuna does not need it.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(target, Value::Dict(..)) {
                        let kind = target.kind();
                        return Err(self.malformed(format!("BUILD on {kind}")));
                    }
                }
                other => {
                    return Err(
                        self.malformed(format!("opcode 0x{other:02x} is not one torch.save uses for a state dict"))
                    );
                }
            }
        }
    }

    /// GLOBAL: resolve against the allow-list, or refuse the whole file.
    fn global(&self, module: &str, name: &str) -> Result<Value> {
        match resolve_global(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => Err(Error::new(format!(
                "refusing to load pickle global {}.{} from {}",
                printable(module),
                printable(name),
                self.file.display()
            ))),
        }
    }

    /// BINPERSID: torch.save's persistent id for a storage,
    /// `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(items, _) = &pid else {
            return Err(self.malformed(format!("persistent id is {}, not a tuple", pid.kind())));
        };
        match &items[..] {
            [Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), _location, Value::Int(numel)]
                if &**tag == "storage" =>
            {
                let numel = u64::try_from(*numel).map_err(|_| self.malformed("negative storage size"))?;
                Ok(Value::Storage(Rc::new(StorageRef { kind: *kind, key: key.to_string(), numel })))
            }
            _ => Err(self.malformed("persistent id is not ('storage', type, key, location, numel)")),
        }
    }

    /// REDUCE: "call" one of the allow-listed builders.
    fn reduce(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(global) = callable else {
            return Err(self.malformed(format!("REDUCE calls {}", callable.kind())));
        };
        let Value::Tuple(args, _) = args else {
            return Err(self.malformed(format!("REDUCE arguments are {}, not a tuple", args.kind())));
        };
        match global {
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                // (storage, storage_offset, size, stride[, requires_grad, backward_hooks[, metadata]])
                let expected = if global == Global::RebuildTensor { 4..=4 } else { 6..=7 };
                if !expected.contains(&args.len()) {
                    return Err(self.malformed(format!("_rebuild_tensor with {} arguments", args.len())));
                }
                let Value::Storage(storage) = &args[0] else {
                    return Err(self.malformed(format!("tensor storage is {}", args[0].kind())));
                };
                let offset = self.non_negative(&args[1], "storage offset")?;
                let shape = self.int_tuple(&args[2], "size")?;
                let stride = self.int_tuple(&args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(self.malformed("tensor size and stride differ in length"));
                }
                Ok(Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, shape, stride })))
            }
            Global::RebuildParameter => {
                // (data, requires_grad, backward_hooks): an nn.Parameter is its tensor here.
                match args.first() {
                    Some(t @ Value::Tensor(_)) if args.len() == 3 => Ok(t.clone()),
                    _ => Err(self.malformed("_rebuild_parameter without a tensor")),
                }
            }
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(self.malformed("OrderedDict called with arguments"));
                }
                Ok(Value::Dict(Rc::new(Vec::new()), 1))
            }
            Global::TorchSize => match &args[..] {
                [size @ Value::Tuple(..)] => Ok(size.clone()),
                _ => Err(self.malformed("torch.Size without a tuple")),
            },
            Global::Storage(_) => Err(self.malformed("a storage class is called")),
        }
    }

    fn non_negative(&self, v: &Value, what: &str) -> Result<u64> {
        match v {
            Value::Int(n) if *n >= 0 => Ok(*n as u64),
            _ => Err(self.malformed(format!("tensor {what} is {} instead of a non-negative int", v.kind()))),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<u64>> {
        let Value::Tuple(items, _) = v else {
            return Err(self.malformed(format!("tensor {what} is {}, not a tuple", v.kind())));
        };
        if items.len() > MAX_DIMS {
            return Err(self.malformed(format!("tensor {what} has {} dimensions", items.len())));
        }
        items.iter().map(|item| self.non_negative(item, what)).collect()
    }
}

/// A name from the file, made safe for a one-line message (no control characters, bounded).
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(120).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().count() > 120 {
        out.push('…');
    }
    out
}
