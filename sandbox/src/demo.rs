//! Deterministic demo contacts: Italian names, regions weighted by population, real cities,
//! E.164 mobile numbers, and custom fields shaped like the seed's (a long tail of spending).
//!
//! Owns only generation; it knows nothing about HTTP or the store's indexes.

use chrono::{Days, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value, json};

use super::store::Contact;

/// Regions with their population in thousands (ISTAT, rounded) and a few real cities each.
const REGIONS: &[(&str, u32, &[&str])] = &[
    ("Lombardia", 10_000, &["Milano", "Brescia", "Bergamo", "Monza", "Como", "Varese", "Pavia"]),
    ("Lazio", 5_700, &["Roma", "Latina", "Viterbo", "Frosinone", "Rieti"]),
    ("Campania", 5_600, &["Napoli", "Salerno", "Caserta", "Avellino", "Benevento"]),
    ("Veneto", 4_850, &["Venezia", "Verona", "Padova", "Vicenza", "Treviso", "Rovigo"]),
    ("Sicilia", 4_800, &["Palermo", "Catania", "Messina", "Siracusa", "Trapani"]),
    ("Emilia-Romagna", 4_450, &["Bologna", "Modena", "Parma", "Reggio Emilia", "Rimini", "Ferrara"]),
    ("Piemonte", 4_250, &["Torino", "Novara", "Alessandria", "Asti", "Cuneo"]),
    ("Puglia", 3_900, &["Bari", "Taranto", "Foggia", "Lecce", "Brindisi"]),
    ("Toscana", 3_650, &["Firenze", "Prato", "Livorno", "Pisa", "Arezzo", "Siena"]),
    ("Calabria", 1_850, &["Reggio Calabria", "Catanzaro", "Cosenza", "Crotone"]),
    ("Sardegna", 1_580, &["Cagliari", "Sassari", "Olbia", "Nuoro"]),
    ("Liguria", 1_510, &["Genova", "La Spezia", "Savona", "Sanremo"]),
    ("Marche", 1_490, &["Ancona", "Pesaro", "Macerata", "Ascoli Piceno"]),
    ("Abruzzo", 1_270, &["Pescara", "L'Aquila", "Chieti", "Teramo"]),
    ("Friuli-Venezia Giulia", 1_190, &["Trieste", "Udine", "Pordenone", "Gorizia"]),
    ("Trentino-Alto Adige", 1_080, &["Trento", "Bolzano", "Rovereto", "Merano"]),
    ("Umbria", 850, &["Perugia", "Terni", "Foligno", "Assisi"]),
    ("Basilicata", 540, &["Potenza", "Matera"]),
    ("Molise", 290, &["Campobasso", "Isernia", "Termoli"]),
    ("Valle d'Aosta", 123, &["Aosta", "Courmayeur"]),
];

const FIRST_NAMES: &[&str] = &[
    "Marco",
    "Giuseppe",
    "Giovanni",
    "Antonio",
    "Francesco",
    "Alessandro",
    "Luca",
    "Andrea",
    "Matteo",
    "Lorenzo",
    "Davide",
    "Simone",
    "Federico",
    "Riccardo",
    "Stefano",
    "Paolo",
    "Roberto",
    "Gabriele",
    "Tommaso",
    "Pietro",
    "Laura",
    "Giulia",
    "Francesca",
    "Chiara",
    "Sara",
    "Martina",
    "Valentina",
    "Alessia",
    "Elena",
    "Anna",
    "Maria",
    "Sofia",
    "Aurora",
    "Giorgia",
    "Federica",
    "Silvia",
    "Paola",
    "Elisa",
    "Beatrice",
    "Camilla",
];

const LAST_NAMES: &[&str] = &[
    "Rossi",
    "Russo",
    "Ferrari",
    "Esposito",
    "Bianchi",
    "Romano",
    "Colombo",
    "Ricci",
    "Marino",
    "Greco",
    "Bruno",
    "Gallo",
    "Conti",
    "De Luca",
    "Mancini",
    "Costa",
    "Giordano",
    "Rizzo",
    "Lombardi",
    "Moretti",
    "Barbieri",
    "Fontana",
    "Santoro",
    "Mariani",
    "Rinaldi",
    "Caruso",
    "Ferrara",
    "Galli",
    "Martini",
    "Leone",
    "Longo",
    "Gentile",
    "Martinelli",
    "Vitale",
    "Lombardo",
    "Serra",
    "Coppola",
    "De Santis",
    "D'Angelo",
    "Marchetti",
];

const MAIL_DOMAINS: &[&str] = &["email.it", "gmail.com", "libero.it", "tiscali.it", "outlook.it"];

/// A deterministic generator: the same seed and `today` give the same contacts.
pub struct DemoData {
    rng: ChaCha8Rng,
    today: NaiveDate,
    region_weight_total: u32,
}

/// Whether demo contact `seq` opted out of marketing: 1 in 50, spread evenly.
pub fn opted_out(seq: u64) -> bool {
    seq % 50 == 7
}

impl DemoData {
    pub fn new(seed: u64, today: NaiveDate) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), today, region_weight_total: REGIONS.iter().map(|r| r.1).sum() }
    }

    /// The contact with sequence number `seq` (its id is `cnt-<seq>`).
    pub fn contact(&mut self, seq: u64) -> Contact {
        let first = FIRST_NAMES[self.rng.random_range(0..FIRST_NAMES.len())];
        let last = LAST_NAMES[self.rng.random_range(0..LAST_NAMES.len())];
        let (region, city) = self.region_and_city();
        let phone =
            format!("+393{:02}{:07}", self.rng.random_range(20..=99u32), self.rng.random_range(0..10_000_000u32));
        let email = format!(
            "{}.{}{}@{}",
            ascii_slug(first),
            ascii_slug(last),
            seq,
            MAIL_DOMAINS[self.rng.random_range(0..MAIL_DOMAINS.len())]
        );
        let mut custom = Map::new();
        custom.insert("lastPurchaseDate".into(), Value::String(self.purchase_date().to_string()));
        custom.insert("totalSpent".into(), json!(self.total_spent()));
        custom.insert("preferredChannel".into(), Value::String(self.channel().into()));
        // About 2 % opted out of marketing (GDPR). Decided by the sequence number, not the random
        // stream, so every other field of every contact is what it was before this field existed.
        if opted_out(seq) {
            custom.insert("gdprOptOut".into(), Value::Bool(true));
        }
        Contact {
            id: format!("cnt-{seq:06}"),
            first_name: Some(first.into()),
            last_name: Some(last.into()),
            phone_number: Some(phone),
            email: Some(email),
            region: Some(region.into()),
            city: Some(city.into()),
            custom_fields: custom,
            extra: Map::new(),
        }
    }

    /// A region drawn by population weight, and one of its cities.
    pub fn region_and_city(&mut self) -> (&'static str, &'static str) {
        let mut pick = self.rng.random_range(0..self.region_weight_total);
        for (name, weight, cities) in REGIONS {
            if pick < *weight {
                return (name, cities[self.rng.random_range(0..cities.len())]);
            }
            pick -= weight;
        }
        // The weights sum to region_weight_total, so the loop always returns; keep the compiler content.
        (REGIONS[0].0, REGIONS[0].2[0])
    }

    /// A purchase date spread evenly over the last two years.
    fn purchase_date(&mut self) -> NaiveDate {
        let back = self.rng.random_range(0..730u64);
        self.today.checked_sub_days(Days::new(back)).unwrap_or(self.today)
    }

    /// Log-normal spending (median about 545 EUR); about 2 % of contacts spend above 5,000 EUR.
    fn total_spent(&mut self) -> f64 {
        let z = self.standard_normal();
        let value = (6.3 + 1.1 * z).exp();
        (value * 100.0).round() / 100.0
    }

    fn channel(&mut self) -> &'static str {
        match self.rng.random_range(0..100u32) {
            0..50 => "SMS",
            50..85 => "WHATSAPP",
            _ => "EMAIL",
        }
    }

    /// Box–Muller: two uniforms make one standard normal draw.
    fn standard_normal(&mut self) -> f64 {
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    pub fn today(&self) -> NaiveDate {
        self.today
    }
}

fn ascii_slug(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The same seed and day give byte-identical contacts; another seed gives others.
    #[test]
    fn same_seed_same_contacts() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 28).expect("valid date");
        let a: Vec<_> = (1..=50)
            .map({
                let mut g = DemoData::new(7, today);
                move |i| serde_json::to_string(&g.contact(i)).expect("json")
            })
            .collect();
        let b: Vec<_> = (1..=50)
            .map({
                let mut g = DemoData::new(7, today);
                move |i| serde_json::to_string(&g.contact(i)).expect("json")
            })
            .collect();
        let c: Vec<_> = (1..=50)
            .map({
                let mut g = DemoData::new(8, today);
                move |i| serde_json::to_string(&g.contact(i)).expect("json")
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    // Spending has a long tail: a few percent above 5,000 EUR, most well below.
    #[test]
    fn spending_has_a_long_tail() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 28).expect("valid date");
        let mut g = DemoData::new(42, today);
        let n = 20_000;
        let vip = (0..n).filter(|_| g.total_spent() > 5000.0).count();
        let share = vip as f64 / n as f64;
        assert!((0.01..0.06).contains(&share), "VIP share {share}");
    }
}
