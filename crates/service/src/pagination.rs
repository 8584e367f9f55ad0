//! Cursors and page sizes for every list. A cursor is the id of the last item of the
//! page before (lists are ordered by id, and ids are UUIDv7): any UUID is a position.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// One page of a list; `next_cursor` is absent on the last page.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Parses the client's `cursor` and `limit` into a store page request. The store is asked
/// for one row more than the limit to know whether another page exists.
pub fn page_request(
    cursor: Option<&str>,
    limit: Option<i64>,
) -> Result<(backvault_store::Page, i64)> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Error::new(
            ErrorKind::BadRequest,
            "invalid_limit",
            format!("limit is 1 to {MAX_LIMIT}"),
        ));
    }
    let after = cursor.map(decode).transpose()?;
    Ok((
        backvault_store::Page {
            after,
            // One more than asked tells whether another page exists; limit <= MAX_LIMIT.
            limit: limit.saturating_add(1),
        },
        limit,
    ))
}

/// Cuts the extra row off and makes the cursor for the next page.
pub fn page<R, T>(
    mut rows: Vec<R>,
    limit: i64,
    id: impl Fn(&R) -> Uuid,
    map: impl Fn(R) -> T,
) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let next_cursor = more.then(|| rows.last().map(|r| encode(id(r)))).flatten();
    Page {
        items: rows.into_iter().map(map).collect(),
        next_cursor,
    }
}

fn encode(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// A cursor: a UUID, or the base64 form servers issued before (`v1:<uuid>`), so that a
/// client paging across an upgrade is not cut off.
fn decode(cursor: &str) -> Result<Uuid> {
    cursor
        .parse::<Uuid>()
        .ok()
        .filter(|_| cursor.len() == 36)
        .or_else(|| {
            URL_SAFE_NO_PAD
                .decode(cursor)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.strip_prefix("v1:").and_then(|id| id.parse().ok()))
        })
        .ok_or_else(|| {
            Error::new(
                ErrorKind::BadRequest,
                "invalid_cursor",
                "the cursor is the next_cursor of a page: a UUID",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let id = Uuid::now_v7();
        assert_eq!(decode(&encode(id)).unwrap(), id);
        let legacy = URL_SAFE_NO_PAD.encode(format!("v1:{id}"));
        assert_eq!(decode(&legacy).unwrap(), id);
        assert_eq!(decode("bm9wZQ").unwrap_err().code, "invalid_cursor");
        assert_eq!(decode("").unwrap_err().code, "invalid_cursor");
        // Only the hyphenated form the schema describes.
        assert_eq!(
            decode(&id.simple().to_string()).unwrap_err().code,
            "invalid_cursor"
        );
        assert_eq!(
            page_request(None, Some(0)).unwrap_err().code,
            "invalid_limit"
        );
        assert_eq!(
            page_request(None, Some(201)).unwrap_err().code,
            "invalid_limit"
        );
        assert_eq!(page_request(None, None).unwrap().0.limit, DEFAULT_LIMIT + 1);
    }

    #[test]
    fn pages_know_when_more_exist() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let p = page(ids.clone(), 2, |id| *id, |id| id);
        assert_eq!(p.items, ids[..2]);
        assert_eq!(decode(p.next_cursor.as_deref().unwrap()).unwrap(), ids[1]);
        let last = page(ids[..2].to_vec(), 2, |id| *id, |id| id);
        assert_eq!(last.next_cursor, None);
    }
}
