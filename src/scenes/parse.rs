//! Read a prompt back into what it asks for ([`Described`]): the colours, shapes, sizes and
//! counts of its objects, how they are placed, and the background. Built for the dataset's
//! phrasings (the tests parse every caption the sampler can write) and forgiving of others: words
//! it does not know are skipped, and a prompt with no colour-shape pair yields `None` (nothing to
//! score).

use super::sample::{Arrangement, Described, Group};
use super::spec::{Background, BackgroundKind, Colour, Position, Shape, Size};

fn words(prompt: &str) -> Vec<String> {
    prompt
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Find `pattern` (words, `*` matching any one word) in `w` from `from`; the index of its start.
fn find(w: &[String], pattern: &[&str], from: usize) -> Option<usize> {
    (from..=w.len().saturating_sub(pattern.len())).find(|&i| {
        pattern
            .iter()
            .enumerate()
            .all(|(j, p)| *p == "*" || w[i + j] == *p)
    })
}

/// What the prompt asks for, if it names at least one coloured shape.
pub fn parse(prompt: &str) -> Option<Described> {
    let mut w = words(prompt);
    let used = |w: &mut Vec<String>, i: usize, n: usize| {
        for x in &mut w[i..i + n] {
            *x = String::from("_");
        }
    };
    let colour = |s: &str| Colour::from_word(s);

    // The background first, blanking its words so its colours are not read as objects'.
    let mut background = None;
    for i in 0..w.len() {
        let word = w[i].clone();
        let prev = |k: usize| (i >= k).then(|| w[i - k].clone());
        let bg = match word.as_str() {
            "background" => {
                // "striped <c1> and <c2> background", "<c1> and <c2> checkered background",
                // "<c> background"
                let pair = |a: Option<String>, and: Option<String>, b: Option<String>| match (
                    a.and_then(|s| colour(&s)),
                    and,
                    b.and_then(|s| colour(&s)),
                ) {
                    (Some(a), Some(and), Some(b)) if and == "and" => Some(vec![a, b]),
                    _ => None,
                };
                if prev(4).as_deref() == Some("striped") {
                    pair(prev(3), prev(2), prev(1)).map(|colours| {
                        (
                            i - 4,
                            5,
                            Background {
                                kind: BackgroundKind::Stripes,
                                colours,
                            },
                        )
                    })
                } else if prev(1).as_deref() == Some("checkered") {
                    pair(prev(4), prev(3), prev(2)).map(|colours| {
                        (
                            i - 4,
                            5,
                            Background {
                                kind: BackgroundKind::Checkerboard,
                                colours,
                            },
                        )
                    })
                } else {
                    prev(1)
                        .and_then(|s| colour(&s))
                        .map(|c| (i - 1, 2, Background::plain(c)))
                }
            }
            "stripes" | "checkerboard" => {
                let kind = if word == "stripes" {
                    BackgroundKind::Stripes
                } else {
                    BackgroundKind::Checkerboard
                };
                match (
                    prev(3).and_then(|s| colour(&s)),
                    prev(2),
                    prev(1).and_then(|s| colour(&s)),
                ) {
                    (Some(a), Some(and), Some(b)) if and == "and" => Some((
                        i - 3,
                        4,
                        Background {
                            kind,
                            colours: vec![a, b],
                        },
                    )),
                    _ => None,
                }
            }
            "sky" => {
                if prev(1).as_deref() == Some("night") || prev(2).as_deref() == Some("night") {
                    let start = if prev(1).as_deref() == Some("night") {
                        i - 1
                    } else {
                        i - 2
                    };
                    Some((
                        start,
                        i + 1 - start,
                        Background {
                            kind: BackgroundKind::Night,
                            colours: vec![],
                        },
                    ))
                } else {
                    prev(1).and_then(|s| colour(&s)).map(|c| {
                        (
                            i - 1,
                            2,
                            Background {
                                kind: BackgroundKind::Sky,
                                colours: vec![c],
                            },
                        )
                    })
                }
            }
            "night" if w.get(i + 1).map(String::as_str) != Some("sky") => Some((
                i,
                1,
                Background {
                    kind: BackgroundKind::Night,
                    colours: vec![],
                },
            )),
            // "<c1> and <c2> polka dots", "<c1> and <c2> polka background"
            "polka" => match (
                prev(3).and_then(|s| colour(&s)),
                prev(2),
                prev(1).and_then(|s| colour(&s)),
            ) {
                (Some(a), Some(and), Some(b)) if and == "and" => {
                    let tail = matches!(
                        w.get(i + 1).map(String::as_str),
                        Some("dots" | "background")
                    );
                    Some((
                        i - 3,
                        4 + tail as usize,
                        Background {
                            kind: BackgroundKind::Polka,
                            colours: vec![a, b],
                        },
                    ))
                }
                _ => None,
            },
            "sea" | "horizon" | "ocean" => Some((
                i,
                1,
                Background {
                    kind: BackgroundKind::Sea,
                    colours: vec![],
                },
            )),
            _ => None,
        };
        if let Some((start, n, b)) = bg {
            if background.is_none() {
                background = Some(b);
            }
            used(&mut w, start, n);
        }
    }

    // Objects: [count] [size] colour shape.
    let mut groups: Vec<(usize, Group)> = Vec::new();
    for i in 0..w.len() {
        let (Some(c), Some(s)) = (
            colour(&w[i]),
            w.get(i + 1).and_then(|x| Shape::from_word(x)),
        ) else {
            continue;
        };
        let before = |k: usize| (i >= k).then(|| w[i - k].as_str());
        let size = match before(1) {
            Some("small") | Some("tiny") | Some("little") => Some(Size::Small),
            Some("large") | Some("big") | Some("huge") => Some(Size::Large),
            _ => None,
        };
        let count_at = if size.is_some() { before(2) } else { before(1) };
        let plural = w[i + 1] == s.plural() && s.plural() != s.name();
        let count = if count_at == Some("two") || plural {
            2
        } else {
            1
        };
        groups.push((
            i,
            Group {
                shape: s,
                colour: c,
                size,
                count,
            },
        ));
    }
    if groups.is_empty() {
        return None;
    }
    let has = |p: &[&str]| find(&w, p, 0);
    let arrangement = if groups.len() >= 3 {
        Arrangement::Row
    } else if groups.len() == 2 {
        let between = |p: &[&str]| find(&w, p, groups[0].0).is_some_and(|i| i < groups[1].0);
        if between(&["above"]) {
            Arrangement::Above
        } else if between(&["below"]) || between(&["under"]) {
            Arrangement::Below
        } else if between(&["left", "of"]) {
            Arrangement::LeftOf
        } else if between(&["right", "of"]) {
            Arrangement::RightOf
        } else {
            Arrangement::NextTo
        }
    } else {
        let pos = if has(&["left"]).is_some() {
            Some(Position::Left)
        } else if has(&["right"]).is_some() {
            Some(Position::Right)
        } else if has(&["top"]).is_some() {
            Some(Position::Top)
        } else if has(&["bottom"]).is_some() {
            Some(Position::Bottom)
        } else if has(&["centre"])
            .or(has(&["center"]))
            .or(has(&["middle"]))
            .is_some()
        {
            Some(Position::Centre)
        } else {
            None
        };
        Arrangement::Alone(if groups[0].1.count >= 2 { None } else { pos })
    };
    groups.truncate(3);
    Some(Described {
        groups: groups.into_iter().map(|(_, g)| g).collect(),
        arrangement,
        background: background.unwrap_or(Background {
            kind: BackgroundKind::Plain,
            colours: vec![],
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes::sample::{Sampler, Split};

    #[test]
    fn every_caption_the_sampler_writes_parses_back() {
        let mut s = Sampler::new(42);
        for i in 0..5000 {
            let x = s.sample(if i % 4 == 0 {
                Split::HeldOut
            } else {
                Split::Train
            });
            assert_eq!(
                parse(&x.caption).as_ref(),
                Some(&x.described),
                "{}",
                x.caption
            );
        }
    }

    #[test]
    fn polka_captions_parse_back() {
        let mut s = Sampler::new(7);
        for i in 0..500 {
            let split = if i % 4 == 0 {
                Split::HeldOut
            } else {
                Split::Train
            };
            let x = s.sample_on(split, BackgroundKind::Polka);
            assert_eq!(x.described.background.kind, BackgroundKind::Polka);
            assert_eq!(
                parse(&x.caption).as_ref(),
                Some(&x.described),
                "{}",
                x.caption
            );
        }
    }

    #[test]
    fn free_prompts() {
        let d = parse("A Large WHITE heart, night sky").expect("parsed");
        assert_eq!(d.groups.len(), 1);
        assert_eq!(d.groups[0].colour, Colour::White);
        assert_eq!(d.groups[0].size, Some(Size::Large));
        assert_eq!(d.background.kind, BackgroundKind::Night);
        assert!(parse("a lighthouse on a cliff at dawn").is_none());
        let d = parse("two small yellow stars above a green square").expect("parsed");
        assert_eq!(d.arrangement, Arrangement::Above);
        assert_eq!(d.groups[0].count, 2);
        assert!(d.background.colours.is_empty());
    }
}
