//! Host↔device transfers of the models' serving paths: uploads that never make the host wait, and
//! the one helper every read back from the device goes through, counted per thread so tests can
//! prove how often a decode step or a ranking waits on the device.

use std::cell::Cell;

use tch::{Device, Tensor};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Copies a host tensor to `device` without waiting for the device: a blocking copy to a GPU
/// waits for every kernel queued before it, so an upload in the middle of a step would stall the
/// host until the work before it ends. On CUDA the data goes through pinned memory (libtorch's
/// caching host allocator), from which the copy is a true asynchronous DMA; the host memory is
/// staged before the call returns, so the source may go at once.
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    match device {
        Device::Cpu => t.shallow_clone(),
        _ => t.pin_memory(device).to_device_(device, t.kind(), true, false),
    }
}

/// [`upload`] as a method, for chains that build a step's inputs.
pub trait Upload {
    fn upload(&self, device: Device) -> Tensor;
}

impl Upload for Tensor {
    fn upload(&self, device: Device) -> Tensor {
        upload(self, device)
    }
}

/// Reads `t` back to the host as a `Vec` in one transfer: the point where the host waits for the
/// device. Every read of the serving paths goes through here, and is counted.
pub fn read<T>(t: &Tensor) -> Vec<T>
where
    Vec<T>: TryFrom<Tensor, Error = tch::TchError>,
{
    READS.with(|r| r.set(r.get() + 1));
    let started = std::time::Instant::now();
    let host = t.to_device(Device::Cpu);
    super::timing::waited(started.elapsed());
    Vec::<T>::try_from(host.flatten(0, -1)).expect("a tensor of the element type asked for")
}

/// How many reads this thread has made through [`read`] so far.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_counted_per_call_and_cpu_uploads_share_storage() {
        let before = reads();
        let t = Tensor::from_slice(&[1i64, 2, 3]).view([3, 1]);
        assert_eq!(read::<i64>(&t), [1, 2, 3]);
        assert_eq!(reads() - before, 1);
        let up = upload(&t, Device::Cpu);
        assert_eq!(up.data_ptr(), t.data_ptr());
        assert_eq!(reads() - before, 1, "an upload is no read");
    }
}
