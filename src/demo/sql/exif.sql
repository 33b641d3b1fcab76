
INSERT INTO "asset_exif" ("assetId", "make", "model", "exifImageWidth", "exifImageHeight",
  "fileSizeInByte", "orientation", "dateTimeOriginal", "latitude", "longitude", "city", "country",
  "description", "fNumber", "iso", "tags", "updatedAt")
SELECT a.id, CASE a."deviceId" WHEN 'Pixel 8' THEN 'Google' ELSE 'Apple' END, a."deviceId",
  CASE WHEN n % 3 = 0 THEN 3024 ELSE 4032 END, CASE WHEN n % 3 = 0 THEN 4032 ELSE 3024 END,
  800000 + (n * 7919) % 4000000, (n % 8 + 1)::text, a."fileCreatedAt",
  CASE WHEN n % 13 = 0 THEN NULL ELSE -60 + ((n * 7919) % 12000) / 100.0 END,
  CASE WHEN n % 13 = 0 THEN NULL ELSE -180 + ((n * 104729) % 36000) / 100.0 END,
  place.city, place.country,
  CASE WHEN n % 3 = 0 THEN 'Café ☕ à ' || place.city || ' — naïve façade 🌸' ELSE '' END,
  1.4 + (n % 7) * 0.4, 50 * (1 + n % 32),
  CASE WHEN n % 5 = 0 THEN ARRAY['famille', 'été', place.city]::character varying[] END,
  a."updatedAt"
FROM (SELECT *, substr("deviceAssetId", 14)::bigint AS n FROM "asset") AS a
CROSS JOIN LATERAL (SELECT
  (ARRAY['Zürich', 'Montréal', '東京', 'São Paulo', 'Reykjavík', 'Kraków'])[a.n % 6 + 1] AS city,
  (ARRAY['Switzerland', 'Canada', '日本', 'Brasil', 'Ísland', 'Polska'])[a.n % 6 + 1] AS country
) AS place;
