//! [`BlobBody`]: a byte range of a blob sent to a client, from the store or from a fill in
//! flight, in chunks.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::window::{FillReader, Located};
use super::{FillError, FillState};
use crate::store::ObjectReader;

/// How much one read from the store hands to the client at most.
const CHUNK: usize = 256 * 1024;

pub struct BlobBody {
    pos: u64,
    /// Exclusive end; `None` until a fill of unknown length is done.
    end: Option<u64>,
    source: Source,
    /// The last buffer read from the store: its memory is used again once the client's socket
    /// has taken its bytes, instead of a fresh allocation per chunk.
    buf: BytesMut,
}

enum Source {
    Cached(Arc<dyn ObjectReader>),
    Filling {
        reader: FillReader,
        progress: watch::Receiver<FillState>,
    },
}

impl BlobBody {
    pub fn cached(reader: Arc<dyn ObjectReader>, start: u64, end: u64) -> BlobBody {
        BlobBody {
            pos: start,
            end: Some(end),
            source: Source::Cached(reader),
            buf: BytesMut::new(),
        }
    }

    pub fn filling(
        reader: FillReader,
        progress: watch::Receiver<FillState>,
        start: u64,
        end: Option<u64>,
    ) -> BlobBody {
        reader.set(start);
        BlobBody {
            pos: start,
            end,
            source: Source::Filling { reader, progress },
            buf: BytesMut::new(),
        }
    }

    /// The next chunk, `Ok(None)` at the end, or the fill's error: the response must then be
    /// aborted so the client does not take a short body for a whole one.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, FillError> {
        loop {
            if self.end.is_some_and(|end| self.pos >= end) {
                return Ok(None);
            }
            let (file, upto) = match &mut self.source {
                Source::Cached(file) => (file.clone(), self.end.unwrap_or(0)),
                Source::Filling { reader, progress } => {
                    let limit = readable(progress, &mut self.end)?;
                    let limit = limit.min(self.end.unwrap_or(u64::MAX));
                    if self.pos >= limit {
                        if self.end.is_some_and(|end| self.pos >= end) {
                            return Ok(None);
                        }
                        if progress.changed().await.is_err() {
                            return Err(FillError::vanished());
                        }
                        continue;
                    }
                    let located = reader.data.tail().locate(self.pos, limit);
                    match located {
                        Located::Memory(bytes) => {
                            self.advance(bytes.len());
                            return Ok(Some(bytes));
                        }
                        Located::Store(upto) => match reader.data.file.get() {
                            Some(file) => (file.clone(), upto),
                            None => return Err(FillError::cache("no reader for the store")),
                        },
                        Located::Gone => return Err(FillError::cache("fell behind the fill")),
                    }
                }
            };
            let bytes = self.read(file, upto).await?;
            self.advance(bytes.len());
            return Ok(Some(bytes));
        }
    }

    fn advance(&mut self, n: usize) {
        self.pos += n as u64;
        if let Source::Filling { reader, .. } = &self.source {
            reader.set(self.pos);
        }
    }

    /// Read from `self.pos` up to `upto` (at most [`CHUNK`]).
    async fn read(&mut self, file: Arc<dyn ObjectReader>, upto: u64) -> Result<Bytes, FillError> {
        let len = (upto - self.pos).min(CHUNK as u64) as usize;
        let spare = std::mem::take(&mut self.buf);
        let (bytes, spare) = file
            .read(self.pos, len, spare)
            .await
            .map_err(|e| FillError::cache(&e.to_string()))?;
        self.buf = spare;
        Ok(bytes)
    }
}

/// How far a fill's bytes can be read right now; sets `end` once a fill of unknown length is
/// verified.
///
/// While a fill is unverified, the last byte of its blob is held back: a client that has
/// every byte takes the body as complete, so that byte waits until the digest has matched.
fn readable(
    progress: &mut watch::Receiver<FillState>,
    end: &mut Option<u64>,
) -> Result<u64, FillError> {
    let state = progress.borrow_and_update().clone();
    match state {
        FillState::Starting => Ok(0),
        FillState::Streaming { received, len } => {
            let verified_part = len.map_or(received, |len| len.saturating_sub(1));
            Ok(received.min(verified_part))
        }
        FillState::Verified { len } => {
            end.get_or_insert(len);
            Ok(len)
        }
        FillState::Failed(err) => Err(err),
    }
}
