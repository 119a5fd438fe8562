/** Prints the driver's config reference table (docs/driver.md embeds it; a test checks it is current). */
import { renderConfigDocs } from '../common/src/config.js';
import { DRIVER_CONFIG_SCHEMA } from '../driver/src/config.js';

process.stdout.write(renderConfigDocs(DRIVER_CONFIG_SCHEMA));
