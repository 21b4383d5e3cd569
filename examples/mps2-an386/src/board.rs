//! The board: a SysTick millisecond clock, the polled CMSDK APB UART0 as an `embedded-io`
//! (blocking and async) transport, and a busy-polling executor for the async client.

use core::future::{Future, poll_fn};
use core::pin::pin;
use core::ptr;
use core::sync::atomic::{AtomicU32, Ordering};
use core::task::{Context, Poll, Waker};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{SCB, SYST};
use cortex_m_rt::exception;
use embedded_io::ErrorKind;
use streambus_core::Instant;
use streambus_core::io::asynch::Timer;

/// The core clock of QEMU's MPS2 boards (SYSCLK, 25 MHz), which SysTick counts.
const CORE_HZ: u32 = 25_000_000;
/// SysTick's reload value: the longest period (2^24 cycles, 671 ms). The time is read from
/// the counter itself, so a late SysTick exception (an emulator on a busy host delivers them
/// late, and a 1 ms tick then loses most of its ticks) costs nothing.
const RELOAD: u32 = 0x00FF_FFFF;

/// SysTick periods since [`start_clock`].
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Starts SysTick on the core clock.
pub fn start_clock(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_counter();
    syst.enable_interrupt();
}

/// Core clock cycles since the clock started.
fn cycles() -> u64 {
    loop {
        let wraps = WRAPS.load(Ordering::Acquire);
        let mut current = SYST::get_current();
        // A wrap whose exception has not run yet: count it, with the counter read after it.
        let pending = SCB::is_pendst_pending();
        if pending {
            current = SYST::get_current();
        }
        if WRAPS.load(Ordering::Acquire) == wraps {
            let periods = u64::from(wraps) + u64::from(pending);
            return periods * (u64::from(RELOAD) + 1) + u64::from(RELOAD - current.min(RELOAD));
        }
    }
}

/// Milliseconds since the clock started (wraps after 49 days).
pub fn millis() -> u32 {
    (cycles() / u64::from(CORE_HZ / 1_000)) as u32
}

/// The client's clock.
pub fn now() -> Instant {
    Instant::from_millis(u64::from(millis()))
}

/// The async client's timer: the SysTick clock, slept on by polling.
#[derive(Debug, Clone, Copy, Default)]
pub struct SysTickTimer;

impl streambus_core::io::Clock for SysTickTimer {
    fn now(&mut self) -> Instant {
        now()
    }
}

impl Timer for SysTickTimer {
    fn sleep_until(&mut self, deadline: Instant) -> impl Future<Output = ()> {
        poll_fn(move |cx| {
            if now() >= deadline {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }
}

/// CMSDK APB UART registers (ARM DDI 0479, "APB UART").
mod reg {
    pub const DATA: usize = 0x000;
    pub const STATE: usize = 0x004;
    pub const CTRL: usize = 0x008;
    pub const BAUDDIV: usize = 0x010;
    /// STATE: the transmit buffer is full.
    pub const TX_FULL: u32 = 1 << 0;
    /// STATE: a received byte waits in the receive buffer.
    pub const RX_FULL: u32 = 1 << 1;
    /// CTRL: transmitter and receiver enabled.
    pub const TX_RX_EN: u32 = 0b11;
}

/// A polled CMSDK APB UART. A blocking read waits for the first byte at most `quiet_ms`
/// (then fails with `TimedOut`, so the client checks its deadlines) and returns what came
/// once the line has been quiet for a millisecond.
#[derive(Debug)]
pub struct Uart {
    base: usize,
    quiet_ms: u32,
}

impl Uart {
    /// UART0 of the MPS2 boards; QEMU's `-serial` connects it.
    pub const UART0: usize = 0x4000_4000;

    /// Enables the UART at `base` (one owner per UART).
    pub fn new(base: usize, quiet_ms: u32) -> Self {
        let uart = Self { base, quiet_ms };
        // 16 is the smallest divider the UART accepts; QEMU ignores the rate.
        uart.write_reg(reg::BAUDDIV, 16);
        uart.write_reg(reg::CTRL, reg::TX_RX_EN);
        uart
    }

    fn read_reg(&self, offset: usize) -> u32 {
        // SAFETY: `base` is the UART's register block (fixed by the board); reads have no
        // effect beyond the UART's own.
        unsafe { ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write_reg(&self, offset: usize, value: u32) {
        // SAFETY: as in `read_reg`; this struct is the UART's one owner.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn try_read_byte(&mut self) -> Option<u8> {
        (self.read_reg(reg::STATE) & reg::RX_FULL != 0).then(|| self.read_reg(reg::DATA) as u8)
    }

    /// Moves the bytes waiting now into `buf`; how many.
    fn drain(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        for slot in buf.iter_mut() {
            let Some(b) = self.try_read_byte() else { break };
            *slot = b;
            n += 1;
        }
        n
    }

    fn write_byte(&mut self, b: u8) {
        while self.read_reg(reg::STATE) & reg::TX_FULL != 0 {}
        self.write_reg(reg::DATA, u32::from(b));
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = ErrorKind;
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        if buf.is_empty() {
            return Ok(0);
        }
        let start = millis();
        let (mut n, mut last) = (0, start);
        loop {
            let got = self.drain(buf.get_mut(n..).unwrap_or_default());
            let t = millis();
            if got > 0 {
                n += got;
                last = t;
                if n == buf.len() {
                    return Ok(n);
                }
            } else if n > 0 && t.wrapping_sub(last) > 1 {
                return Ok(n);
            } else if n == 0 && t.wrapping_sub(start) >= self.quiet_ms {
                return Err(ErrorKind::TimedOut);
            }
        }
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        for &b in buf {
            self.write_byte(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), ErrorKind> {
        while self.read_reg(reg::STATE) & reg::TX_FULL != 0 {}
        Ok(())
    }
}

impl embedded_io_async::Read for Uart {
    /// Completes with the bytes waiting once there is at least one; cancel-safe (nothing is
    /// taken from the UART by a poll that returns `Pending`).
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        poll_fn(|cx| {
            let n = self.drain(buf);
            if n > 0 || buf.is_empty() {
                Poll::Ready(Ok(n))
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await
    }
}

impl embedded_io_async::Write for Uart {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        embedded_io::Write::write(self, buf)
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        embedded_io::Write::flush(self)
    }
}

/// Runs `future` to completion, polling it in a loop (the UART and the timer are polled, so
/// there is nothing to sleep on).
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}
