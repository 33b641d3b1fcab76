
INSERT INTO "geodata_places" ("name", "longitude", "latitude", "countryCode", "admin1Name", "modificationDate")
SELECT (ARRAY['Zürich', 'Montréal', 'Tōkyō', 'São Paulo', 'Reykjavík', 'Kraków', 'Ålesund', 'Łódź'])[g % 8 + 1] || ' ' || g,
  -180 + ((g * 104729) % 36000) / 100.0, -80 + ((g * 7919) % 16000) / 100.0,
  (ARRAY['CH', 'CA', 'JP', 'BR', 'IS', 'PL', 'NO', 'PL'])[g % 8 + 1],
  CASE WHEN g % 4 = 0 THEN NULL ELSE 'Région ' || (g % 20) END,
  date '2025-01-01' + (g % 120)
FROM generate_series(1, 400) AS g;
