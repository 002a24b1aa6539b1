//! NumPy .npz reading and writing (placeholder: being written).
