#!/usr/bin/env python3
"""Build the FHIR value sets and the offline drug terminology from codes.json.

    python tools/build_valuesets.py [--codes ../shared/clinical/codes.json]

Generates (deterministically: sorted, stable JSON, trailing newline):

* rules/valuesets/<id>.json             one FHIR R4 ValueSet (with expansion) per clinical concept
* rules/terminology/rxnorm-ingredients.json   offline RxNorm product/PIN -> ingredient (IN) rollup

rules/terminology/drug-names.yaml (names, brands and combinations, each with its DailyMed reference) is
hand-maintained data since issue 9; terminology.py validates it at load.

Rules of the road (see rules/valuesets/README.md):

* Only codes.json entries with ``verified: true`` and a non-null code are used. Nothing is invented.
* The only other source is the CDC ICD-10-CM tabular shipped in the PyPI package ``simple-icd-10-cm``
  (used to expand ICD-10-CM category heads to all their descendants). Such codes carry that package
  and tabular file as their provenance.
* Every code's provenance (the codes.json ``source`` string) is written to
  ``contains[].extension`` (url CODE_SOURCE_EXT).

To change a value set, edit the VALUESETS table below and re-run this script.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
import uuid
from collections import defaultdict
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"  # VSAC/eCQM (and HL7 THO) URI for ICD-10-PCS

CANONICAL_BASE = "https://migraine-med-safety.example.org/fhir"
CODE_SOURCE_EXT = f"{CANONICAL_BASE}/StructureDefinition/code-source"
VERSION = "1.0.0"
TIMESTAMP = "2026-11-21T00:00:00Z"  # fixed so that re-runs are byte-identical
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"{CANONICAL_BASE}/ValueSet")

# Code-system spellings that may appear in codes.json `system` fields -> canonical FHIR URIs.
SYSTEM_ALIASES = {
    # RxNorm
    "rxnorm": RXNORM, "RXNORM": RXNORM, "2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    # ICD-10-CM
    "icd-10-cm": ICD10CM, "ICD10CM": ICD10CM, "ICD-10-CM": ICD10CM, "2.16.840.1.113883.6.90": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM, "http://hl7.org/fhir/sid/icd-10": ICD10CM,
    # SNOMED CT
    "snomed": SNOMED, "SNOMEDCT": SNOMED, "SNOMED CT": SNOMED, "SNOMEDCT_US": SNOMED,
    "2.16.840.1.113883.6.96": SNOMED, "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    # LOINC
    "loinc": LOINC, "LOINC": LOINC, "2.16.840.1.113883.6.1": LOINC, "urn:oid:2.16.840.1.113883.6.1": LOINC,
    # ICD-10-PCS
    "ICD10PCS": ICD10PCS, "ICD-10-PCS": ICD10PCS, "2.16.840.1.113883.6.4": ICD10PCS,
    "urn:oid:2.16.840.1.113883.6.4": ICD10PCS,
}
KNOWN_SYSTEMS = {RXNORM, ICD10CM, SNOMED, LOINC, ICD10PCS}

# ---------------------------------------------------------------------------------------------
# VALUE SET DEFINITIONS
#
# id -> {title, description, include: [recipe items]}
#
# A recipe item is one of
#   {"set": <codes.json key>, ...filters}    codes from that codes.json value set (verified only)
#        "codes":   [..]        keep only these codes (each must exist and be verified, else error)
#        "exclude": [..]        drop these codes
#        "where":   {field: v}  keep codes whose field == v (or is in v, when v is a list)
#        "any":     [flags]     keep codes where at least one of these boolean flags is true
#        "descendants": True    also add every ICD-10-CM tabular descendant of each kept code
#   {"icd10cm": [codes], "descendants": bool}   codes taken straight from the ICD-10-CM tabular
#   {"icd10cm_categories": [first, last]}       every ICD-10-CM category in [first, last] + descendants
#   {"valueset": <id>}                          everything in another value set of this table
# ---------------------------------------------------------------------------------------------
VALUESETS: dict[str, dict] = {
    # ---- Drugs (RxNorm) ---------------------------------------------------------------------
    "rx-opioids": {
        "title": "Opioid analgesics (ingredients and salts)",
        "description": "Opioid agonist, partial agonist and mixed agonist-antagonist ingredients (IN) and "
                       "their salt forms (PIN). Products are matched by rolling them up to these ingredients.",
        "include": [{"set": "rx_opioid_agonist_ingredients"}, {"set": "rx_opioid_precise_ingredients"}],
    },
    "rx-moud-opioids": {
        "title": "Opioids used for opioid use disorder (buprenorphine, methadone)",
        "description": "Buprenorphine and methadone ingredients and salts, for MOUD-continuation suppression.",
        "include": [
            {"set": "rx_opioid_agonist_ingredients", "codes": ["1819", "6813"]},
            {"set": "rx_opioid_precise_ingredients", "codes": ["203841", "218337"]},
        ],
    },
    "rx-parenteral-opioid-products": {
        "title": "Parenteral opioid products commonly ordered in the ED",
        "description": "Injectable hydromorphone, morphine, fentanyl and meperidine SCD/SBD codes.",
        "include": [{"set": "rx_parenteral_opioid_scd_examples"}],
    },
    "rx-dihydroergotamine": {
        "title": "Dihydroergotamine (DHE)",
        "description": "Dihydroergotamine ingredient, its mesylate salt and verified DHE products.",
        "include": [
            {"set": "rx_ergot_alkaloids", "codes": ["3418", "203176"]},
            {"set": "rx_dhe_products"},
        ],
    },
    "rx-ergots-other-than-dhe": {
        "title": "Ergot alkaloids other than dihydroergotamine",
        "description": "Ergotamine (incl. tartrate and caffeine/ergotamine), methylergonovine (incl. maleate), "
                       "ergonovine and methysergide. Excludes DHE and the ergot-derived dopamine agonists "
                       "bromocriptine and cabergoline.",
        "include": [{"set": "rx_ergot_alkaloids",
                     "codes": ["4025", "42676", "214336", "6883", "84158", "4021", "6911"]}],
    },
    "rx-triptans": {
        "title": "Triptans (5-HT1B/1D agonists)",
        "description": "Triptan ingredients, salts, naproxen/sumatriptan and verified triptan products. "
                       "Excludes lasmiditan (5-HT1F 'ditan', not named by the DHE label).",
        "include": [
            {"set": "rx_triptans_5ht1_agonists", "exclude": ["2256930"]},
            {"set": "rx_triptan_product_examples"},
        ],
    },
    "rx-strong-cyp3a4-inhibitors": {
        "title": "Strong CYP3A4 inhibitors",
        "description": "DHE label-named and FDA/ONC strong CYP3A4 inhibitors (DHE boxed warning).",
        "include": [{"set": "rx_strong_cyp3a4_inhibitors"}],
    },
    "rx-moderate-cyp3a4-inhibitors": {
        "title": "Moderate / label-caution CYP3A4 inhibitors",
        "description": "DHE label 'use with caution' CYP3A4 inhibitors plus FDA moderate inhibitors.",
        "include": [{"set": "rx_moderate_or_label_caution_cyp3a4_inhibitors"}],
    },
    "rx-vasopressors-systemic": {
        "title": "Systemic vasopressors",
        "description": "Epinephrine, norepinephrine, phenylephrine, vasopressin, dopamine, angiotensin II, "
                       "mephentermine (role 'pressor') and verified injectable vasopressor products. "
                       "Phenylephrine is also an oral decongestant: use the product dose form to tell routes.",
        "include": [
            {"set": "rx_vasoconstrictors_vasopressors",
             "codes": ["3992", "7512", "8163", "11149", "3628", "1999003", "6756"]},
            {"set": "rx_vasopressor_scd_examples"},
        ],
    },
    "rx-epinephrine": {
        "title": "Epinephrine",
        "description": "Epinephrine ingredient and its verified injectable products (subset of rx-vasopressors-systemic; "
                       "lets rules grade a single IM/SC dose apart from an infusion).",
        "include": [
            {"set": "rx_vasoconstrictors_vasopressors", "codes": ["3992"]},
            {"set": "rx_vasopressor_scd_examples", "codes": ["245317", "310116", "310132"]},
        ],
    },
    "rx-vasopressors-other-than-epinephrine": {
        "title": "Systemic vasopressors other than epinephrine",
        "description": "rx-vasopressors-systemic without epinephrine: norepinephrine, phenylephrine, vasopressin, "
                       "dopamine, angiotensin II, mephentermine and their verified injectable products.",
        "include": [
            {"set": "rx_vasoconstrictors_vasopressors", "codes": ["7512", "8163", "11149", "3628", "1999003", "6756"]},
            {"set": "rx_vasopressor_scd_examples",
             "codes": ["313578", "2103185", "2399910", "1743939", "1743870", "2058469", "1743869"]},
        ],
    },
    "rx-vasoconstrictors-oral": {
        "title": "Other (non-infusion) vasoconstrictors",
        "description": "Midodrine, droxidopa, pseudoephedrine, ephedrine, isometheptene, phenylpropanolamine "
                       "and cocaine (topical, but systemically active).",
        "include": [{"set": "rx_vasoconstrictors_vasopressors",
                     "codes": ["6963", "1489913", "8896", "3966", "27946", "8175", "2653"]}],
    },
    "rx-nasal-decongestants": {
        "title": "Topical nasal/ophthalmic decongestants",
        "description": "Oxymetazoline, naphazoline, tetrahydrozoline (low systemic risk).",
        "include": [{"set": "rx_vasoconstrictors_vasopressors", "codes": ["7812", "7247", "37935"]}],
    },
    "rx-ketamine": {
        "title": "Ketamine",
        "description": "Ketamine ingredient, hydrochloride salt and verified ketamine products (SCD/SBD, and "
                       "the SCDF/SCDG dose-form level concepts).",
        "include": [
            {"set": "rx_ketamine_esketamine", "codes": ["6130", "203184"]},
            {"set": "rx_ketamine_scd_examples"},
        ],
    },
    "rx-esketamine": {
        "title": "Esketamine",
        "description": "Esketamine ingredient (no verified product codes available).",
        "include": [{"set": "rx_ketamine_esketamine", "codes": ["2119365"]}],
    },
    "rx-hydromorphone": {
        "title": "Hydromorphone",
        "description": "Hydromorphone ingredient and its hydrochloride salt; products roll up to them. For the opioid "
                       "rule's AHS 2025 Level A 'must not offer' (IV hydromorphone for migraine in the ED).",
        "include": [
            {"set": "rx_opioid_agonist_ingredients", "codes": ["3423"]},
            {"set": "rx_opioid_precise_ingredients", "codes": ["203177"]},
        ],
    },
    "rx-dopamine-antagonists": {
        "title": "Dopamine antagonist antiemetics/antipsychotics used for migraine",
        "description": "Prochlorperazine, metoclopramide, chlorpromazine, droperidol, haloperidol: ingredients, "
                       "salts and verified injectable products.",
        "include": [
            {"set": "rx_migraine_alternatives",
             "codes": ["8704", "8705", "8706", "6915", "267036", "2403", "104728", "3648", "5093"]},
            {"set": "rx_migraine_alternative_scd_examples",
             "codes": ["1730076", "1730077", "1730078", "204416", "1719647"]},
        ],
    },
    "rx-ketorolac": {
        "title": "Ketorolac",
        "description": "Ketorolac ingredient, tromethamine salt and verified injectable products.",
        "include": [
            {"set": "rx_migraine_alternatives", "codes": ["35827", "28200"]},
            {"set": "rx_migraine_alternative_scd_examples",
             "codes": ["860096", "1665461", "860092", "1665459", "860113", "860114"]},
        ],
    },
    "rx-nsaids-parenteral": {
        "title": "NSAIDs given parenterally for migraine",
        "description": "Ketorolac (all of rx-ketorolac) plus ibuprofen and ketoprofen ingredients.",
        "include": [
            {"valueset": "rx-ketorolac"},
            {"set": "rx_migraine_alternatives", "codes": ["5640", "6142"]},
        ],
    },
    "rx-sumatriptan": {
        "title": "Sumatriptan",
        "description": "Sumatriptan ingredient, succinate salt, naproxen/sumatriptan and verified sumatriptan "
                       "products.",
        "include": [
            {"set": "rx_triptans_5ht1_agonists", "codes": ["37418", "67158", "797426"]},
            {"set": "rx_triptan_product_examples"},
        ],
    },
    "rx-dexamethasone": {
        "title": "Dexamethasone",
        "description": "Dexamethasone ingredient and sodium phosphate salt.",
        "include": [{"set": "rx_migraine_alternatives", "codes": ["3264", "48933"]}],
    },
    "rx-valproate": {
        "title": "Valproate",
        "description": "Valproate, valproic acid and divalproex sodium.",
        "include": [{"set": "rx_migraine_alternatives", "codes": ["40254", "11118", "266856"]}],
    },

    # ---- Conditions (ICD-10-CM + SNOMED CT) -------------------------------------------------
    "cond-migraine": {
        "title": "Migraine",
        "description": "All billable G43 migraine codes and SNOMED concepts flagged migraine "
                       "(excluding the non-disorder concepts 363558001 drug product and 726678001 device).",
        "include": [
            {"set": "migraine_icd10cm"},
            {"set": "migraine_headache_snomed", "where": {"migraine": True},
             "exclude": ["363558001", "726678001"]},
        ],
    },
    "cond-headache": {
        "title": "Headache other than migraine (headache context)",
        "description": "Nonspecific and tension-type headache, cluster headache/TACs and medication-overuse "
                       "(drug-induced) headache. Use together with cond-migraine as 'headache context'.",
        "include": [
            {"set": "headache_nonspecific_icd10cm"},
            {"set": "cluster_headache_tac_icd10cm"},
            {"set": "medication_overuse_headache_icd10cm"},
            {"set": "migraine_headache_snomed", "any": ["cluster", "medicationOveruse"]},
            # "[X]Drug-induced headache, not elsewhere classified" (= ICD-10 G44.4, whose inclusion term
            # is medication overuse headache); unflagged in codes.json, included explicitly.
            {"set": "migraine_headache_snomed",
             "codes": ["193084008", "194501000", "418301000000106", "419971000000109"]},
            {"set": "condition_anchor_snomed", "where": {"category": "headache"}},
        ],
    },
    "cond-migraine-refractory": {
        "title": "Refractory/intractable migraine or status migrainosus",
        "description": "Intractable migraine and migraine with status migrainosus (ICD-10-CM), and SNOMED "
                       "migraine concepts flagged refractory/intractable or status migrainosus.",
        "include": [
            {"set": "migraine_intractable_icd10cm"},
            {"set": "status_migrainosus_icd10cm"},
            {"set": "migraine_headache_snomed", "where": {"migraine": True},
             "any": ["refractoryOrIntractable", "statusMigrainosus"]},
        ],
    },
    "cond-hemiplegic-or-basilar-migraine": {
        "title": "Hemiplegic or basilar-type migraine",
        "description": "Hemiplegic migraine (G43.4-) and SNOMED hemiplegic or basilar migraine concepts.",
        "include": [
            {"set": "hemiplegic_migraine_icd10cm"},
            {"set": "migraine_headache_snomed", "any": ["hemiplegic", "basilar"]},
        ],
    },
    "cond-migraine-with-aura": {
        "title": "Migraine with aura (G43.1-, basilar migraine possible)",
        "description": "G43.1- migraine with aura; 'basilar migraine' is an inclusion term of G43.1, so ICD-10-CM "
                       "cannot rule out brainstem aura.",
        "include": [{"set": "migraine_with_aura_incl_basilar_icd10cm"}],
    },
    "cond-coronary-artery-disease": {
        "title": "Coronary artery disease / ischemic heart disease",
        "description": "Ischemic heart disease, angina (incl. vasospastic), myocardial infarction, CABG/PCI status.",
        "include": [
            {"set": "coronary_artery_disease_icd10cm"},
            {"set": "vsac_ischemic_heart_disease_related"},
            {"set": "vsac_stable_unstable_angina"},
            {"set": "vsac_myocardial_infarction"},
            {"set": "vsac_coronary_artery_disease_no_mi"},
            {"set": "condition_anchor_snomed", "where": {"category": ["cad", "cad_vasospasm"]}},
        ],
    },
    "cond-peripheral-arterial-disease": {
        "title": "Peripheral arterial disease",
        "description": "Peripheral arterial disease; the VSAC Atherosclerosis and PAD set also includes coronary, "
                       "cerebral, aortic and diabetic angiopathy codes.",
        "include": [
            {"set": "peripheral_arterial_disease_icd10cm"},
            {"set": "vsac_atherosclerosis_and_pad"},
            {"set": "condition_anchor_snomed", "where": {"category": "pad"}},
        ],
    },
    "cond-raynaud": {
        "title": "Raynaud's syndrome / phenomenon",
        "description": "Raynaud's syndrome (I73.0-) and SNOMED Raynaud's disease/phenomenon.",
        "include": [
            {"set": "raynaud_icd10cm"},
            {"set": "condition_anchor_snomed", "where": {"category": "raynaud"}},
        ],
    },
    "cond-hypertensive-crisis": {
        "title": "Hypertensive urgency, emergency, crisis or encephalopathy",
        "description": "I16.- hypertensive crisis codes, I67.4 hypertensive encephalopathy and SNOMED "
                       "hypertensive urgency/encephalopathy.",
        "include": [
            {"set": "hypertensive_crisis_icd10cm"},
            {"set": "condition_anchor_snomed", "where": {"category": "htn_crisis"}},
        ],
    },
    "cond-hypertension": {
        "title": "Hypertension",
        "description": "Hypertension diagnoses (incl. hypertensive crisis). From the VSAC 'Finding of Elevated "
                       "Blood Pressure or Hypertension' set the elevated-reading-without-diagnosis findings "
                       "(R03.0, 371622005, 24184005) are left out.",
        "include": [
            {"set": "hypertension_icd10cm"},
            {"set": "vsac_essential_hypertension"},
            {"set": "vsac_elevated_bp_or_hypertension_finding",
             "exclude": ["R03.0", "371622005", "24184005"]},
            {"set": "condition_anchor_snomed", "where": {"category": "htn"}},
            {"valueset": "cond-hypertensive-crisis"},
        ],
    },
    "cond-pregnancy": {
        "title": "Pregnancy",
        "description": "Pregnancy state and pregnancy-related conditions.",
        "include": [
            {"set": "pregnancy_core_icd10cm"},
            {"set": "vsac_pregnancy"},
            {"set": "vsac_pregnant_state"},
            {"set": "condition_anchor_snomed", "where": {"category": "pregnancy"}},
        ],
    },
    "cond-lactation": {
        "title": "Lactation",
        "description": "Lactating mother.",
        "include": [{"set": "lactation_icd10cm"}],
    },
    "cond-sepsis": {
        "title": "Sepsis",
        "description": "Sepsis / septic shock (VSAC Sepsis ICD-10-CM and SNOMED).",
        "include": [
            {"set": "vsac_sepsis_icd10cm"},
            {"set": "vsac_sepsis_snomed"},
            {"set": "condition_anchor_snomed", "where": {"category": "sepsis"}},
        ],
    },
    "cond-severe-hepatic-impairment": {
        "title": "Severe hepatic impairment",
        "description": "Hepatic failure / decompensated liver disease.",
        "include": [
            {"set": "severe_hepatic_impairment_icd10cm"},
            {"set": "vsac_liver_disease_moderate_to_severe"},
            {"set": "condition_anchor_snomed", "where": {"category": "hepatic"}},
        ],
    },
    "cond-hepatic-encephalopathy": {
        "title": "Hepatic encephalopathy",
        "description": "Hepatic encephalopathy or hepatic coma (Child-Pugh score item). Every code here is also "
                       "in cond-severe-hepatic-impairment.",
        "include": [
            {"set": "condition_anchor_snomed", "codes": ["13920009"]},
            {"set": "severe_hepatic_impairment_icd10cm",
             "codes": ["B19.0", "B19.11", "B19.21", "K70.41", "K72.01", "K72.11", "K72.91"]},
        ],
    },
    "cond-severe-renal-impairment": {
        "title": "Severe renal impairment",
        "description": "CKD stage 4/5, end-stage renal disease and dialysis.",
        "include": [
            {"set": "severe_renal_impairment_icd10cm"},
            {"set": "vsac_end_stage_renal_disease"},
            {"set": "vsac_ckd_stage5"},
            {"set": "condition_anchor_snomed", "where": {"category": "renal"}},
        ],
    },
    "cond-stroke-or-tia": {
        "title": "Stroke or TIA (incl. history)",
        "description": "Ischemic/hemorrhagic stroke, TIA and their sequelae/history.",
        "include": [
            {"set": "stroke_tia_history_icd10cm"},
            {"set": "vsac_cerebrovascular_stroke_or_tia"},
            {"set": "condition_anchor_snomed", "where": {"category": "stroke"}},
        ],
    },
    "cond-seizure-disorder": {
        "title": "Epilepsy / seizure disorder",
        "description": "Epilepsy, seizure disorder and convulsions.",
        "include": [
            {"set": "epilepsy_seizure_icd10cm"},
            {"set": "vsac_epilepsy"},
            {"set": "vsac_seizure_disorder"},
            {"set": "condition_anchor_snomed", "where": {"category": "seizure"}},
        ],
    },
    "cond-psychosis": {
        "title": "Psychotic disorders",
        "description": "Schizophrenia spectrum and other psychotic disorders, mood disorders with psychotic features.",
        "include": [
            {"set": "psychosis_icd10cm"},
            {"set": "vsac_schizophrenia_or_psychotic_disorder"},
            {"set": "condition_anchor_snomed", "where": {"category": "psychosis"}},
        ],
    },
    "cond-substance-use-disorder": {
        "title": "Substance use disorders",
        "description": "ICD-10-CM F10-F19 (category heads and every tabular descendant; includes F16 hallucinogen "
                       "incl. ketamine/PCP and F17 nicotine), VSAC Substance Use Disorder and SNOMED drug dependence.",
        "include": [
            {"set": "substance_use_disorder_icd10cm_prefixes", "where": {"matchDescendants": True},
             "descendants": True},
            {"set": "vsac_substance_use_disorder"},
            {"set": "condition_anchor_snomed", "where": {"category": "sud"}},
        ],
    },
    "cond-medication-overuse-headache": {
        "title": "Medication-overuse headache",
        "description": "Drug-induced headache NEC (G44.40, G44.41; 'Medication overuse headache' is an inclusion "
                       "term of G44.4) and the SNOMED CT concepts of medication overuse: medication overuse "
                       "headache, analgesic overuse headache ('headache caused by drug', 294091000119104, is left "
                       "out: it includes headaches a drug causes without overuse, e.g. nitrates).",
        "include": [
            {"set": "medication_overuse_headache_icd10cm", "codes": ["G44.40", "G44.41"]},
            {"set": "migraine_headache_snomed", "where": {"medicationOveruse": True},
             "codes": ["698803006", "103012002"]},
        ],
    },
    "cond-opioid-use-disorder": {
        "title": "Opioid use disorder",
        "description": "VSAC Opioid Use Disorder plus F11 and all its ICD-10-CM tabular descendants.",
        "include": [
            {"set": "vsac_opioid_use_disorder"},
            {"icd10cm": ["F11"], "descendants": True},
        ],
    },
    "cond-malignancy-or-palliative-care": {
        "title": "Malignant neoplasm or palliative care",
        "description": "Every ICD-10-CM code in C00-C96 (malignant neoplasms; category heads, subcategories and "
                       "billable codes) plus Z51.5 Encounter for palliative care, from the ICD-10-CM tabular.",
        "include": [
            {"icd10cm_categories": ["C00", "C96"]},
            {"icd10cm": ["Z51.5"]},
        ],
    },
    "proc-vascular-surgery": {
        "title": "Vascular surgery / coronary revascularisation procedures",
        "description": "PCI and CABG procedures (ICD-10-PCS and SNOMED), for the 'following vascular surgery' window.",
        "include": [{"set": "vsac_pci_procedures"}, {"set": "vsac_cabg_surgeries"}],
    },

    # ---- Observations (LOINC) ---------------------------------------------------------------
    "obs-systolic-bp": {
        "title": "Systolic blood pressure",
        "description": "Systolic blood pressure observation (also a component of the BP panel).",
        "include": [{"set": "observation_loinc", "codes": ["8480-6"]}],
    },
    "obs-diastolic-bp": {
        "title": "Diastolic blood pressure",
        "description": "Diastolic blood pressure observation (also a component of the BP panel).",
        "include": [{"set": "observation_loinc", "codes": ["8462-4"]}],
    },
    "obs-bp-panel": {
        "title": "Blood pressure panel",
        "description": "Blood pressure panel; read systolic/diastolic from its components.",
        "include": [{"set": "observation_loinc", "codes": ["85354-9"]}],
    },
    "obs-egfr": {
        "title": "Estimated glomerular filtration rate",
        "description": "eGFR (CKD-EPI, CKD-EPI 2021, MDRD) observations.",
        "include": [{"set": "observation_loinc", "codes": ["62238-1", "98979-8", "48642-3", "48643-1"]}],
    },
    "obs-bilirubin-total": {
        "title": "Bilirubin, total (serum or plasma)",
        "description": "Total bilirubin, mass per volume (Child-Pugh score).",
        "include": [{"set": "observation_loinc", "codes": ["1975-2"]}],
    },
    "obs-albumin": {
        "title": "Albumin (serum or plasma)",
        "description": "Albumin, mass per volume (Child-Pugh score).",
        "include": [{"set": "observation_loinc", "codes": ["1751-7"]}],
    },
    "obs-inr": {
        "title": "INR",
        "description": "International normalised ratio (Child-Pugh score).",
        "include": [{"set": "observation_loinc", "codes": ["6301-6", "34714-6"]}],
    },
    "obs-pregnancy-test": {
        "title": "Pregnancy test (hCG)",
        "description": "hCG / pregnancy test observations (VSAC Pregnancy Test plus urine/serum hCG codes). "
                       "Pregnancy status 82810-3 is not included (unverified).",
        "include": [
            {"set": "vsac_pregnancy_test_loinc"},
            {"set": "observation_loinc", "codes": ["2106-3", "2118-8", "21198-7"]},
        ],
    },
}

# RxNorm dose forms recognised at the end of product names (longest match wins). The OMTK rollup's
# doseForm values are added at run time.
EXTRA_DOSE_FORMS = [
    "Injectable Solution", "Injection", "Prefilled Syringe", "Cartridge", "Auto-Injector",
    "Metered Dose Nasal Spray", "Nasal Spray", "Oral Tablet", "Oral Capsule", "Oral Solution",
    "Injectable Product",  # an SCDG dose-form group name
]

ROLLUP_DESCRIPTION = (
    "Offline RxNorm rollup generated by tools/build_valuesets.py from codes.json. 'products': product-level "
    "RxCUIs (SCD/SBD/GPCK/BPCK/SCDF/SCDG, and the multiple-ingredient MIN concepts) -> tracked ingredient "
    "(TTY=IN) RxCUIs. Sources: the CDC OMTK opioid drug->ingredient table (ingredientCode, doseForm), every "
    "verified product-level code in the codes.json rx_* sets and the VSAC 'Opioids, All' list; products are "
    "mapped by matching the tracked IN names inside the product name (case-insensitive, whole words), so "
    "multi-ingredient products get every tracked ingredient they name. doseForm is the RxNorm dose form at "
    "the end of the product name (null when unknown). 'preciseIngredients': PIN RxCUI -> IN RxCUI by name. "
    "Only ingredients tracked in codes.json appear (e.g. naloxone, caffeine are not tracked)."
)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
class BuildError(Exception):
    pass


def canonical_system(system: str | None, default: str | None) -> str:
    system = system or default
    if system is None:
        raise BuildError("code without a system")
    system = SYSTEM_ALIASES.get(system.strip(), system.strip())
    if system not in KNOWN_SYSTEMS:
        raise BuildError(f"unknown code system {system!r}; add it to SYSTEM_ALIASES")
    return system


def pascal_case(vs_id: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]", vs_id) if part)


def source_keys(source: str) -> list[str]:
    """Short source keys of a codes.json source string, e.g. 'OHDSI:856.json; EPRO' -> ['OHDSI', 'EPRO']."""
    keys = []
    for part in source.split(";"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("github christillman/encounterpro_os"):
            key = "EPRO"
        elif part.startswith("github PEDSnet/"):
            key = "PEDSNET"
        else:
            key = re.split(r':| \(| "', part, maxsplit=1)[0].strip()
        keys.append(key)
    return keys


def clean_display(display: str) -> str:
    """Drop curator annotations such as ' (PSN: SUMAtriptan succinate 100 MG Oral Tablet)'."""
    return re.sub(r"\s*\(PSN:[^)]*\)\s*$", "", display).strip()


def name_pattern(name: str) -> re.Pattern:
    """Case-insensitive whole-word pattern for an ingredient name."""
    return re.compile(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])")


def sort_key(code: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", code)]


# ---------------------------------------------------------------------------------------------
# ICD-10-CM tabular (simple-icd-10-cm)
# ---------------------------------------------------------------------------------------------
class Icd10cmTabular:
    def __init__(self):
        try:
            import simple_icd_10_cm as cm
        except ImportError as exc:  # pragma: no cover
            raise BuildError("pip install simple-icd-10-cm (needed to expand ICD-10-CM descendants)") from exc
        self.cm = cm
        version = importlib.metadata.version("simple-icd-10-cm")
        data_dir = Path(cm.__file__).parent / "data"
        tabular = sorted(p.name for p in data_dir.glob("icd10c*-tabular-*.xml")) or ["tabular file unknown"]
        self.source = f"PyPI simple-icd-10-cm {version}: CDC ICD-10-CM tabular {tabular[-1]}"

    def code(self, code: str) -> tuple[str, str]:
        cm = self.cm
        if not cm.is_valid_item(code) or not (cm.is_category_or_subcategory(code)
                                               or cm.is_extended_subcategory(code)):
            raise BuildError(f"{code} is not an ICD-10-CM code in the tabular")
        return cm.add_dot(code), cm.get_description(code)

    def descendants(self, code: str) -> list[tuple[str, str]]:
        return [self.code(c) for c in self.cm.get_descendants(code)]

    def categories(self, first: str, last: str) -> list[str]:
        return sorted({c for c in self.cm.get_all_codes(True)
                       if self.cm.is_category(c) and first <= c <= last})


# ---------------------------------------------------------------------------------------------
# Value sets
# ---------------------------------------------------------------------------------------------
class Builder:
    def __init__(self, codes: dict, icd: Icd10cmTabular):
        self.codes = codes
        self.icd = icd
        self.systems_seen: dict[str, set[str]] = defaultdict(set)  # raw system spelling -> codes.json sets
        self.built: dict[str, dict] = {}  # id -> {(system, code): {"display", "sources": set, "from": set}}
        self.skipped_unverified: dict[str, list] = defaultdict(list)

    # each member: (system, code) -> {"display": str, "sources": set[str], "sets": set[str]}
    def _add(self, members, system, code, display, source, origin):
        key = (system, code)
        entry = members.setdefault(key, {"display": display, "sources": set(), "sets": set()})
        entry["sources"].add(source)
        entry["sets"].add(origin)

    def verified_codes(self, set_name: str):
        if set_name not in self.codes:
            raise BuildError(f"codes.json has no value set {set_name!r}")
        vs = self.codes[set_name]
        for item in vs["codes"]:
            if item.get("verified") is not True or not item.get("code"):
                self.skipped_unverified[set_name].append(item.get("code") or item.get("display"))
                continue
            raw = item.get("system") or vs.get("system")
            self.systems_seen[raw].add(set_name)
            yield item, canonical_system(item.get("system"), vs.get("system"))

    def build(self, vs_id: str) -> dict:
        if vs_id in self.built:
            return self.built[vs_id]
        recipe = VALUESETS[vs_id]
        members: dict = {}
        for step in recipe["include"]:
            if "set" in step:
                self._from_codes_json(vs_id, step, members)
            elif "icd10cm" in step:
                for code in step["icd10cm"]:
                    c, display = self.icd.code(code)
                    self._add(members, ICD10CM, c, display, self.icd.source, "ICD-10-CM tabular")
                    if step.get("descendants"):
                        for d, dd in self.icd.descendants(c):
                            self._add(members, ICD10CM, d, dd, self.icd.source, "ICD-10-CM tabular")
            elif "icd10cm_categories" in step:
                first, last = step["icd10cm_categories"]
                for cat in self.icd.categories(first, last):
                    for c, display in [self.icd.code(cat)] + self.icd.descendants(cat):
                        self._add(members, ICD10CM, c, display, self.icd.source, "ICD-10-CM tabular")
            elif "valueset" in step:
                for key, entry in self.build(step["valueset"]).items():
                    for src in entry["sources"]:
                        for origin in entry["sets"]:
                            self._add(members, key[0], key[1], entry["display"], src, origin)
            else:
                raise BuildError(f"{vs_id}: unknown recipe step {step}")
        if not members:
            raise BuildError(f"{vs_id}: no verified codes - refusing to write an empty value set")
        self.built[vs_id] = members
        return members

    def _from_codes_json(self, vs_id, step, members):
        set_name = step["set"]
        wanted = step.get("codes")
        exclude = set(step.get("exclude", []))
        found = set()
        for item, system in self.verified_codes(set_name):
            code = item["code"]
            if wanted is not None and code not in wanted:
                continue
            if code in exclude:
                continue
            ok = True
            for field, value in (step.get("where") or {}).items():
                ok &= (item.get(field) in value) if isinstance(value, list) else (item.get(field) == value)
            if step.get("any"):
                ok &= any(item.get(flag) is True for flag in step["any"])
            if not ok:
                continue
            found.add(code)
            self._add(members, system, code, clean_display(item["display"]), item["source"], set_name)
            if step.get("descendants"):
                if system != ICD10CM:
                    raise BuildError(f"{vs_id}: descendants only for ICD-10-CM ({set_name} {code})")
                for d, dd in self.icd.descendants(code):
                    self._add(members, ICD10CM, d, dd, self.icd.source, "ICD-10-CM tabular")
        if wanted is not None and set(wanted) - found:
            raise BuildError(f"{vs_id}: codes {sorted(set(wanted) - found)} not verified in {set_name}")

    def valueset_resource(self, vs_id: str) -> dict:
        recipe = VALUESETS[vs_id]
        members = self.build(vs_id)
        sets = sorted({s for e in members.values() for s in e["sets"]})
        keys = sorted({k for e in members.values() for s in e["sources"] for k in source_keys(s)})
        description = (f"{recipe['description']} Built by tools/build_valuesets.py from codes.json value sets: "
                       f"{', '.join(s for s in sets if s != 'ICD-10-CM tabular')}"
                       if any(s != "ICD-10-CM tabular" for s in sets) else
                       f"{recipe['description']} Built by tools/build_valuesets.py")
        if "ICD-10-CM tabular" in sets:
            description += f"; ICD-10-CM descendants from {self.icd.source}"
        description += f". Source keys: {', '.join(keys)}."
        contains = []
        for (system, code), entry in sorted(members.items(), key=lambda kv: (kv[0][0], sort_key(kv[0][1]))):
            contains.append({
                "extension": [{"url": CODE_SOURCE_EXT, "valueString": s} for s in sorted(entry["sources"])],
                "system": system,
                "code": code,
                "display": entry["display"],
            })
        return {
            "resourceType": "ValueSet",
            "id": vs_id,
            "url": f"{CANONICAL_BASE}/ValueSet/{vs_id}",
            "version": VERSION,
            "name": pascal_case(vs_id),
            "title": recipe["title"],
            "status": "active",
            "description": description,
            "expansion": {
                "identifier": f"urn:uuid:{uuid.uuid5(UUID_NAMESPACE, vs_id)}",
                "timestamp": TIMESTAMP,
                "total": len(contains),
                "contains": contains,
            },
        }


# ---------------------------------------------------------------------------------------------
# RxNorm rollup and drug names
# ---------------------------------------------------------------------------------------------
def tracked_ingredients(codes: dict) -> dict[str, str]:
    """All verified TTY=IN codes in the codes.json rx_* sets: rxcui -> display."""
    out = {}
    for name, vs in codes.items():
        if not name.startswith("rx_"):
            continue
        for item in vs["codes"]:
            if item.get("verified") is True and item.get("code") and item.get("tty") == "IN":
                out.setdefault(item["code"], item["display"])
    return out


def ingredient_matchers(ingredients: dict[str, str]) -> list[tuple[str, re.Pattern]]:
    out = []
    for code, display in ingredients.items():
        name = re.sub(r"\s*\(USP\)$", "", display)  # "vasopressin (USP)" is written so in product names too
        out.append((code, name_pattern(name)))
    return out


def match_ingredients(display: str, matchers) -> set[str]:
    text = display.lower()
    return {code for code, pattern in matchers if pattern.search(text)}


def dose_form(display: str, forms: list[str]) -> str | None:
    name = re.sub(r"\s*\[[^\]]*\]\s*$", "", clean_display(display))  # drop " [Brand]"
    if name.startswith("{") or name.endswith(" Pack"):
        return "Pack"
    for form in forms:  # longest first
        if name.endswith(" " + form):
            return form
    return None


def build_rollup(codes: dict) -> tuple[dict, dict]:
    ingredients = tracked_ingredients(codes)
    matchers = ingredient_matchers(ingredients)
    omtk = codes["rx_opioid_drug_to_ingredient_rollup_omtk"]["codes"]
    forms = sorted({c["doseForm"] for c in omtk if c.get("doseForm")} | set(EXTRA_DOSE_FORMS),
                   key=lambda f: (-len(f), f))
    report = {"unmapped": [], "omtk_name_mismatch": [], "unmapped_pins": [], "no_dose_form": []}
    products: dict[str, dict] = {}

    def add(code, display, ingr, form):
        entry = products.setdefault(code, {"display": display, "ingredients": set(), "doseForm": form})
        entry["ingredients"] |= ingr
        entry["doseForm"] = entry["doseForm"] or form

    # 1. verified product-level codes (and MINs) in the curated rx_* sets - their displays win
    for set_name, vs in sorted(codes.items()):
        if not set_name.startswith("rx_") or set_name in (
                "rx_opioid_drug_to_ingredient_rollup_omtk", "rx_opioids_all_vsac_2_16_840_1_113762_1_4_1196_226"):
            continue
        for item in vs["codes"]:
            if item.get("verified") is not True or not item.get("code") or item.get("tty") in ("IN", "PIN"):
                continue
            display = clean_display(item["display"])
            ingr = match_ingredients(display, matchers)
            form = None if item.get("tty") == "MIN" else dose_form(display, forms)
            if not ingr:
                report["unmapped"].append((item["code"], display, set_name))
                continue
            add(item["code"], display, ingr, form)
    # 2. OMTK opioid rollup (ingredientCode + doseForm given; name matching adds co-ingredients)
    for item in omtk:
        if item.get("verified") is not True or not item.get("code"):
            continue
        ingr = match_ingredients(item["display"], matchers)
        if item["ingredientCode"] not in ingr:
            report["omtk_name_mismatch"].append((item["code"], item["display"], item["ingredientCode"]))
        add(item["code"], item["display"], ingr | {item["ingredientCode"]},
            item.get("doseForm") or dose_form(item["display"], forms))
    # 3. VSAC "Opioids, All"
    for item in codes["rx_opioids_all_vsac_2_16_840_1_113762_1_4_1196_226"]["codes"]:
        if item.get("verified") is not True or not item.get("code"):
            continue
        ingr = match_ingredients(item["display"], matchers)
        if not ingr:
            report["unmapped"].append((item["code"], item["display"], "rx_opioids_all_vsac"))
            continue
        add(item["code"], item["display"], ingr, dose_form(item["display"], forms))

    # PIN -> IN by name: the IN name must be a whole-word prefix of the PIN name (longest wins)
    precise = {}
    for set_name, vs in sorted(codes.items()):
        if not set_name.startswith("rx_"):
            continue
        for item in vs["codes"]:
            if item.get("verified") is not True or not item.get("code") or item.get("tty") != "PIN":
                continue
            pin = item["display"].lower()
            cands = [(len(d), c) for c, d in ingredients.items()
                     if pin.startswith(d.lower() + " ") or pin == d.lower()]
            if not cands:
                report["unmapped_pins"].append((item["code"], item["display"]))
                continue
            precise[item["code"]] = max(cands)[1]

    for code, entry in products.items():
        if entry["doseForm"] is None:
            report["no_dose_form"].append((code, entry["display"]))
    out_products = {
        code: {"display": e["display"], "ingredients": sorted(e["ingredients"], key=int), "doseForm": e["doseForm"]}
        for code, e in sorted(products.items(), key=lambda kv: int(kv[0]))
    }
    rollup = {
        "description": ROLLUP_DESCRIPTION,
        "system": RXNORM,
        "products": out_products,
        "preciseIngredients": dict(sorted(precise.items(), key=lambda kv: int(kv[0]))),
    }
    return rollup, report


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def write(path: Path, text: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text(encoding="utf-8") if path.exists() else None
    if old != text:
        path.write_text(text, encoding="utf-8")
        return True
    return False


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", type=Path, default=repo.parent / "shared" / "clinical" / "codes.json",
                    help="path to codes.json (default: <repo>/../shared/clinical/codes.json)")
    ap.add_argument("--out", type=Path, default=repo / "rules", help="rules directory (default: <repo>/rules)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    codes = json.loads(args.codes.read_text(encoding="utf-8"))
    builder = Builder(codes, Icd10cmTabular())
    changed = []
    counts = {}
    vs_dir = args.out / "valuesets"
    for vs_id in VALUESETS:
        resource = builder.valueset_resource(vs_id)
        counts[vs_id] = resource["expansion"]["total"]
        if write(vs_dir / f"{vs_id}.json", dump_json(resource)):
            changed.append(f"valuesets/{vs_id}.json")
    stray = sorted(p.name for p in vs_dir.glob("*.json") if p.stem not in VALUESETS)

    rollup, report = build_rollup(codes)
    if write(args.out / "terminology" / "rxnorm-ingredients.json", dump_json(rollup)):
        changed.append("terminology/rxnorm-ingredients.json")

    if not args.quiet:
        print("value sets:")
        for vs_id, n in counts.items():
            print(f"  {vs_id:40s} {n:5d}")
        print("code systems seen in codes.json (raw spelling -> sets):")
        for raw, sets in sorted(builder.systems_seen.items(), key=lambda kv: str(kv[0])):
            canon = SYSTEM_ALIASES.get(raw, raw)
            print(f"  {raw} -> {canon} ({len(sets)} sets)")
        print("skipped (unverified or null code):")
        for set_name, items in sorted(builder.skipped_unverified.items()):
            print(f"  {set_name}: {sorted(set(map(str, items)))}")
        print(f"rollup: {len(rollup['products'])} products, {len(rollup['preciseIngredients'])} PINs")
        for key, rows in report.items():
            print(f"  {key}: {len(rows)}")
            for row in rows:
                print(f"    {row}")
        if stray:
            print(f"WARNING: files in {vs_dir} not produced by this script: {stray}")
        print("changed:", ", ".join(changed) if changed else "nothing")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as exc:
        print(f"build_valuesets: {exc}", file=sys.stderr)
        sys.exit(1)
