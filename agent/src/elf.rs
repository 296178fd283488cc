//! Reading program files for uprobes: where a function's code is in the file.

pub mod go;

/// The file offset of virtual address `address` (inside a loaded segment's file bytes): what a
/// uprobe is attached at.
pub fn file_offset<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    address: u64,
) -> Option<u64> {
    use object::{Object, ObjectSegment};
    file.segments().find_map(|seg| {
        let (offset, size) = seg.file_range();
        let start = seg.address();
        (address >= start && address - start < size).then(|| offset + (address - start))
    })
}
